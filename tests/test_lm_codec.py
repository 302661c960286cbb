"""The LM codec: payload round trips, independence from batch size, typed errors on bad input.

Most tests use a tiny deterministic model with the byte tokenizer so they run in seconds; one test
(marked slow, run in CI) goes through the real default model."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from codec import LM, ZSTD, ChecksumMismatch, ContainerError, ModelMismatch, Registry, Truncated
from codec.lm.codec import LMCodec
from codec.lm.tokenizer import ByteTokenizer
from tests.fake_engine import BigramEngine
from tests.lm_helpers import tiny_engine

ADVERSARIAL = [
    b"", b"a", b"\x00", b"\x00" * 300, b"\xff\xfe\xed\xa0\x80", b"a\r\nb\r\n", b"  lead",
    bytes(range(256)), b"z" * 600, "naïve café 日本 🙂".encode(),
]
TEXT = (b"It is a truth universally acknowledged, that a single man in possession of a good "
        b"fortune, must be in want of a wife. However little known the feelings or views of such a "
        b"man may be on his first entering a neighbourhood, this truth is so well fixed in the minds "
        b"of the surrounding families, that he is considered the rightful property of some one or "
        b"other of their daughters. \"My dear Mr. Bennet,\" said his lady to him one day, \"have "
        b"you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. "
        b"\"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all "
        b"about it.\" Mr. Bennet made no answer. \"Do you not want to know who has taken it?\" "
        b"cried his wife impatiently. \"You want to tell me, and I have no objection to hearing "
        b"it.\"\n")


def make_codec(engine=None, **kw) -> LMCodec:
    kw.setdefault("segment_tokens", 64)  # several segments even for short inputs
    return LMCodec((engine or tiny_engine(), ByteTokenizer()), **kw)


def trained(seed: int = 0) -> BigramEngine:
    return BigramEngine(seed=seed, train=TEXT)


@pytest.fixture(scope="module", params=["bigram", "tiny"])
def codec(request):
    engine = trained() if request.param == "bigram" else tiny_engine()
    return make_codec(engine, batch=4)


def round_trip(c: LMCodec, data: bytes) -> bytes:
    payload = c.encode_payload(data)
    (out,) = c.decode_many([(payload, len(data))])
    assert out == data
    return payload


@pytest.mark.parametrize("data", ADVERSARIAL)
def test_adversarial_round_trip(codec, data):
    round_trip(codec, data)


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_round_trip(data):
    round_trip(make_codec(BigramEngine(), batch=3), data)


def test_decode_many_mixed_lengths(codec):
    datas = [TEXT[:300], b"", b"x", TEXT[:100], bytes(range(200))]
    payloads = [codec.encode_payload(d) for d in datas]
    assert codec.decode_many([(p, len(d)) for p, d in zip(payloads, datas)]) == datas


def test_payload_independent_of_batch():
    """The same bytes give the same payload whatever the batch; each decodes with any batch."""
    engine, data = tiny_engine(), TEXT[:300]  # 5 segments of <= 63 tokens
    payloads = {b: make_codec(engine, batch=b).encode_payload(data) for b in (1, 2, 16)}
    assert len(set(payloads.values())) == 1
    payload = payloads[1]
    for b in (1, 3):
        assert make_codec(engine, batch=b).decode_many([(payload, len(data))]) == [data]


def test_segments_are_cut_at_the_configured_length():
    c = make_codec(BigramEngine(), segment_tokens=33)
    payload = c.encode_payload(b"q" * 100)  # 100 tokens -> 4 segments of <= 32
    assert payload[:3] == bytes([1, 100, 32])


def test_text_compresses():
    assert len(make_codec(trained()).encode_payload(TEXT)) < len(TEXT) / 2


def test_binary_is_skipped_quickly(codec):
    assert codec.encode(os.urandom(5000)) is None
    assert codec.encode(TEXT) is not None


def test_truncated_payload_raises_typed_error(codec):
    payload = codec.encode_payload(TEXT)
    for cut in (0, 1, 2, 3, 5, len(payload) // 2, len(payload) - 1):
        with pytest.raises(Truncated):
            codec.decode_many([(payload[:cut], len(TEXT))])


def test_garbled_payload_never_gives_wrong_bytes():
    """Flip bytes of the payload one at a time: decoding fails with a ContainerError or — when the
    damage is in coded words — the registry's checksum catches it. Never wrong bytes."""
    codec = make_codec(trained())
    reg = Registry()
    reg.add_model(codec)
    blob = reg.encode(TEXT, codecs=(LM,), fingerprint=codec.fingerprint)
    assert reg.header(blob).codec_id == LM
    start = reg.header(blob).payload_offset
    for i in range(start, len(blob), max(1, (len(blob) - start) // 40)):
        bad = bytearray(blob)
        bad[i] ^= 0x5A
        try:
            out = reg.decode(bytes(bad))
        except ContainerError:
            continue
        assert out == TEXT  # a flip the coder happened to absorb; never anything else


def test_trailing_bytes_are_an_error(codec):
    payload = codec.encode_payload(TEXT)
    with pytest.raises(ChecksumMismatch):
        codec.decode_many([(payload + b"\0\0\0\0", len(TEXT))])


def test_wrong_length_is_an_error(codec):
    payload = codec.encode_payload(TEXT)
    with pytest.raises(ChecksumMismatch):
        codec.decode_many([(payload, len(TEXT) + 1)])


def test_registry_round_trip_and_model_mismatch():
    c0, c1 = make_codec(trained(0)), make_codec(trained(1))
    assert c0.fingerprint != c1.fingerprint and len(c0.fingerprint) == 16
    reg = Registry()
    reg.add_model(c0)
    blob = reg.encode(TEXT, codecs=(ZSTD, LM), fingerprint=c0.fingerprint)
    assert reg.header(blob).codec_id == LM
    assert reg.decode(blob) == TEXT
    other = Registry()
    other.add_model(c1)
    with pytest.raises(ModelMismatch, match="not loaded"):
        other.decode(blob)


def test_fingerprint_depends_on_segment_format_not_batch():
    e = tiny_engine()
    assert make_codec(e, batch=1).fingerprint == make_codec(e, batch=9, threads=1).fingerprint


@pytest.mark.slow
def test_real_default_model_round_trip():
    """A few hundred bytes of English through SmolLM2-135M and its BPE tokenizer."""
    from codec.lm import open_codec
    c = open_codec(batch=4)
    text = (b"The Free Software Foundation may publish revised and/or new versions of the GNU "
            b"General Public License from time to time. Such new versions will be similar in "
            b"spirit to the present version, but may differ in detail to address new problems "
            b"or concerns.\n\nEach version is given a distinguishing version number.\r\n\xff")
    payload = c.encode_payload(text)
    assert len(payload) < len(text) * 0.35  # an LM, not a byte model: well under 3 bits/byte
    assert c.decode_many([(payload, len(text))]) == [text]
