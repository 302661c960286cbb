"""Tokenization is lossless for every byte string (docs/design.md, "Containers and codecs") and deterministic."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmfs.codec.lm.tokenizer import ByteLevelBPE, ByteTokenizer, gpt2_bytes_to_unicode

from tests.lm_helpers import smollm2_tokenizer_json

ADVERSARIAL = [
    b"",
    b"a",
    b" ",
    b"\x00",
    b"\x00" * 100,
    b"\xff",
    b"\xfe\xff",
    b"\x80",
    b"\xc0\xaf",
    b"\xed\xa0\x80",  # a lone surrogate, UTF-8-encoded (invalid UTF-8)
    b"\xed\xa0\x80\xed\xb0\x80",  # a surrogate pair encoded CESU-style
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xe2\x82",  # truncated multi-byte sequence
    b"a\r\nb\r\n",
    b"\r",
    b"\r\r\n\n",
    b"  leading spaces",
    b" ",
    b"\t\tx",
    b"trailing   ",
    "caf\u00e9 cafe\u0301 \ufb01 \u212b \uff21".encode(),  # text an NFC/NFKC normalizer would change
    "日本語のテキスト 🙂".encode(),
    "\ufeffBOM".encode(),
    b"<|endoftext|><|im_start|>user",
    b"\x04\x06\x13\x14\x16\x1d",
    b"x\x04y",
    bytes(range(256)),
    bytes(range(255, -1, -1)),
    b"a" * 5000,
    b" " * 3000,
    b"\n" * 2000,
]


@pytest.fixture(scope="module")
def bpe() -> ByteLevelBPE:
    return ByteLevelBPE(smollm2_tokenizer_json())


def test_byte_table_is_a_bijection():
    table = gpt2_bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256


@pytest.mark.parametrize("data", ADVERSARIAL)
def test_bpe_adversarial_round_trip(bpe, data):
    ids = bpe.encode(data)
    assert bpe.decode(ids) == data
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.encode(data) == ids  # deterministic


@pytest.mark.parametrize("data", ADVERSARIAL)
def test_byte_tokenizer_round_trip(data):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(data)) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_bpe_random_bytes(bpe, data):
    assert bpe.decode(bpe.encode(data)) == data


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_bpe_random_text(bpe, text):
    data = text.encode("utf-8")
    assert bpe.decode(bpe.encode(data)) == data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ADVERSARIAL[:30] + [b"hello", b" world", b"\n"]), max_size=12))
def test_bpe_concatenations(bpe, parts):
    data = b"".join(parts)
    assert bpe.decode(bpe.encode(data)) == data


def test_bpe_text_uses_the_models_own_tokens(bpe):
    """Valid text tokenizes exactly as the HF tokenizer does (what the model was trained on)."""
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(smollm2_tokenizer_json())
    text = "The quick brown fox jumps over the lazy dog.\n  def f(x):\r\n    return x\n"
    assert bpe.encode(text.encode()) == hf.encode(text, add_special_tokens=False).ids


def test_special_token_text_is_plain_text(bpe):
    ids = bpe.encode(b"<|endoftext|>")
    assert len(ids) > 1 and bpe.escape_id not in ids


def test_unmapped_bytes_are_escaped(bpe):
    """SmolLM2's vocabulary has no token for 0xff; it becomes ESCAPE 'f' 'f'."""
    ids = bpe.encode(b"\xff")
    assert ids[0] == bpe.escape_id and bpe.decode(ids[1:]) == b"ff"
    assert bpe.decode(ids) == b"\xff"


def test_corrupt_escape_raises(bpe):
    with pytest.raises(ValueError):
        bpe.decode([bpe.escape_id, bpe.encode(b"z")[0], bpe.encode(b"0")[0]])
    with pytest.raises(ValueError):
        bpe.decode([bpe.escape_id])


def test_large_text_round_trip(bpe):
    path = "/usr/share/common-licenses/GPL-3"
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    data = open(path, "rb").read()
    ids = bpe.encode(data)
    assert bpe.decode(ids) == data
    assert len(data) / len(ids) > 4  # real BPE tokens, not a byte fallback
