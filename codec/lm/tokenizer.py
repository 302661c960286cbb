"""Lossless tokenization: every byte string becomes token ids and comes back byte for byte.

The LM codec codes token ids, so `decode(encode(data)) == data` must hold for *every* byte string —
invalid UTF-8, encoded lone surrogates, NUL, CRLF, leading spaces, the empty string.

Two tokenizers share one small interface (`encode(bytes) -> list[int]`, `decode(ids) -> bytes`,
`vocab_size`, `identity`):

  * `ByteTokenizer` — token id = byte value (256 ids). It goes with `Engine.tiny` in tests.
  * `ByteLevelBPE` — a GPT-2-style byte-level BPE (SmolLM2's) built from a HF tokenizers JSON.

How `ByteLevelBPE` stays byte-exact although the HF API takes `str`:
  * Decoding never goes through `str`: every vocabulary entry is mapped once through the inverse of
    GPT-2's byte→unicode table to the bytes it stands for, and decoding concatenates those bytes.
  * Encoding splits the input into maximal valid-UTF-8 runs and the bytes between them. A valid run is
    tokenized by the HF pipeline (ByteLevel pre-tokenizer + BPE, so tokens are the ones the model was
    trained on); added/special tokens are removed from that pipeline and normalizers/post-processors
    are dropped, so text such as "<|endoftext|>" is ordinary text and nothing is rewritten. A byte that
    is not valid UTF-8 becomes its single-byte token.
  * SmolLM2's vocabulary lacks 21 of the 256 single-byte tokens (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d,
    0xc0, 0xc1, 0xf5–0xff: bytes its training text never had). Such a byte is written as three tokens,
    ESCAPE + two lowercase hex digits ("ff"), where ESCAPE is a special token ("<|endoftext|>", or the
    lowest-numbered added token), which the BPE path never produces. Rare in text; binary data goes
    to zstd anyway.
  * Every valid run is checked (`decode(ids) == run`); a run that would not round-trip falls back to
    one token per byte. So losslessness never depends on what the HF library does with a string.

Determinism: the result is a pure function of the bytes and the tokenizer's canonical form. BPE
without dropout is deterministic; the HF library's word cache only saves work. (Encoders on different
machines need not even agree — the token ids are what is coded — but identical output makes
containers reproducible.)

The canonical form (`canonical_bpe`): the vocabulary as a list indexed by id, the merges as pairs,
the added tokens, the pre-tokenizer spec and the BPE options — a JSON value of our own, serialised
one way only (modelfile.canonical_json). It is the tokenizer's identity (hashed into the codec
fingerprint) and what a model file stores; JSON whitespace, key order and the spelling of merges
that a transformers/tokenizers release happens to write do not move it. Decoding needs only the
id -> bytes table made from it and never imports `tokenizers`; encoding rebuilds the HF pipeline
from it (`hf_json`).

Threading: a tokenizer is immutable after construction; `encode`/`decode` may run in any thread.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from functools import lru_cache

from .modelfile import canonical_json

# Invalid UTF-8 bytes appear as U+DC80..U+DCFF after decoding with "surrogateescape" (a bijection).
_INVALID_UTF8 = "\udc80-\udcff"


@lru_cache(maxsize=1)
def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte ↦ a printable unicode character (byte-level BPE's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ByteTokenizer:
    """Token id = byte value. Ids >= 256 (BOS and other specials of the tiny test model) never occur
    in encoded data."""

    vocab_size = 256
    identity = b"llmfs-byte-tokenizer-v1"

    def encode(self, data: bytes) -> list[int]:
        return list(bytes(data))

    def decode(self, ids) -> bytes:
        return bytes(int(i) for i in ids)


class UnsupportedTokenizer(Exception):
    """The tokenizer JSON is not a byte-level BPE this module can make lossless."""


class ByteLevelBPE:
    def __init__(self, tokenizer):
        """`tokenizer`: a HF tokenizers JSON string, or the canonical form (canonical_bpe)."""
        if isinstance(tokenizer, str):
            self.source_json: str | None = tokenizer  # legacy fingerprints hash it (loader.py)
            canon = canonical_bpe(tokenizer)
        else:
            self.source_json, canon = None, tokenizer
        if canon.get("kind") != "byte-level-bpe" or canon.get("version") != 1:
            raise UnsupportedTokenizer(
                f"unknown canonical tokenizer {canon.get('kind')!r} version {canon.get('version')!r}"
            )
        self.canonical = canon
        self.identity = canonical_json(canon)  # what the codec fingerprint hashes
        tokens: list[str | None] = canon["tokens"]
        self.vocab_size = len(tokens)
        vocab = {t: i for i, t in enumerate(tokens) if t is not None}
        added = [(int(i), str(c)) for i, c in canon["added"]]
        special = {c for _, c in added}

        # id -> bytes. Special tokens decode to b"" — encode never produces them.
        b2u = gpt2_bytes_to_unicode()
        u2b = {u: b for b, u in b2u.items()}
        self._id_bytes: list[bytes] = [b""] * self.vocab_size
        for i, token in enumerate(tokens):
            if token is None or token in special:
                continue
            try:
                self._id_bytes[i] = bytes(u2b[c] for c in token)
            except KeyError:
                raise UnsupportedTokenizer(f"vocabulary entry {token!r} is not byte-level") from None
        escape = [i for i, c in added if c == "<|endoftext|>"] or [i for i, _ in added]
        self.escape_id = escape[0] if escape else None
        try:
            self._hex_id = [vocab[c] for c in "0123456789abcdef"]
        except KeyError:
            raise UnsupportedTokenizer("vocabulary lacks the hex digits 0-9a-f") from None
        self._hex_value = {i: v for v, i in enumerate(self._hex_id)}
        # byte -> its token sequence: one byte-level token, or the escape for the missing ones
        self._byte_ids: list[tuple[int, ...]] = []
        for b in range(256):
            if b2u[b] in vocab:
                self._byte_ids.append((vocab[b2u[b]],))
            elif self.escape_id is not None:
                self._byte_ids.append((self.escape_id, self._hex_id[b >> 4], self._hex_id[b & 15]))
            else:
                raise UnsupportedTokenizer(
                    f"vocabulary has no token for byte {b:#04x} and no special token to escape it"
                )

        # Text runs end at invalid UTF-8 and at ASCII bytes without a token (they get escaped).
        unmapped = "".join(re.escape(chr(b)) for b in range(128) if len(self._byte_ids[b]) > 1)
        self._byte_path = re.compile(f"[{_INVALID_UTF8}{unmapped}]+")
        self._hf_pipeline = None
        self._hf_lock = threading.Lock()

    @property
    def _hf(self):
        """The HF pipeline that encodes valid UTF-8 runs, built on first use: decoding never needs
        the `tokenizers` package."""
        if self._hf_pipeline is None:
            with self._hf_lock:
                if self._hf_pipeline is None:
                    from tokenizers import Tokenizer

                    self._hf_pipeline = Tokenizer.from_str(hf_json(self.canonical, pipeline=True))
        return self._hf_pipeline

    @property
    def digest(self) -> bytes:
        return hashlib.blake2b(self.identity, digest_size=16).digest()

    def encode(self, data: bytes) -> list[int]:
        data = bytes(data)
        text = data.decode("utf-8", "surrogateescape")
        ids: list[int] = []
        pos = 0
        for m in self._byte_path.finditer(text):
            self._encode_valid(text[pos : m.start()], ids)
            self._encode_bytes(m.group().encode("utf-8", "surrogateescape"), ids)
            pos = m.end()
        self._encode_valid(text[pos:], ids)
        return ids

    def _encode_valid(self, run: str, out: list[int]) -> None:
        if not run:
            return
        raw = run.encode("utf-8")
        got = self._hf.encode(run, add_special_tokens=False).ids
        if self.decode(got) == raw:
            out.extend(got)
        else:  # a run with an unmapped byte (e.g. "\x04"), or the HF library surprised us
            self._encode_bytes(raw, out)

    def _encode_bytes(self, raw: bytes, out: list[int]) -> None:
        for b in raw:
            out.extend(self._byte_ids[b])

    def decode(self, ids) -> bytes:
        """Bytes of the token ids. Raises ValueError on an escape not followed by two hex digits
        (only a corrupt payload can contain one)."""
        table = self._id_bytes
        ids = [int(i) for i in ids]
        esc = self.escape_id
        if esc is None or esc not in ids:
            return b"".join([table[i] for i in ids])
        out = []
        it = iter(ids)
        for i in it:
            if i != esc:
                out.append(table[i])
                continue
            hi, lo = self._hex_value.get(next(it, -1)), self._hex_value.get(next(it, -1))
            if hi is None or lo is None:
                raise ValueError("escape token not followed by two hex digits")
            out.append(bytes((hi << 4 | lo,)))
        return b"".join(out)


def _is_byte_level(pre: dict) -> bool:
    if pre.get("type") == "ByteLevel":
        return True
    if pre.get("type") == "Sequence":
        return any(p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))
    return False


def canonical_bpe(tokenizer_json: str) -> dict:
    """The canonical form of a HF tokenizers JSON: what determines the token ids and nothing else.

    JSON whitespace, key order, the merges' spelling ("a b" or ["a", "b"]) and the normalizer,
    post-processor and decoder fields (encode drops them) do not enter it, so
    re-serialising a tokenizer with another transformers or tokenizers release keeps its
    identity (and the codec fingerprint made from it)."""
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or not _is_byte_level(pre):
        raise UnsupportedTokenizer("only GPT-2-style byte-level BPE tokenizers are supported")
    vocab: dict[str, int] = model["vocab"]
    tokens: list[str | None] = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    return {
        "kind": "byte-level-bpe",
        "version": 1,
        "tokens": tokens,
        "merges": merges,
        "added": sorted([int(t["id"]), t["content"]] for t in spec.get("added_tokens", [])),
        "pre_tokenizer": pre,
        "bpe": {
            "continuing_subword_prefix": model.get("continuing_subword_prefix") or "",
            "end_of_word_suffix": model.get("end_of_word_suffix") or "",
            "unk_token": model.get("unk_token"),
            "fuse_unk": bool(model.get("fuse_unk", False)),
            "byte_fallback": bool(model.get("byte_fallback", False)),
            "ignore_merges": bool(model.get("ignore_merges", False)),
        },
    }


def hf_json(canon: dict, pipeline: bool = False) -> str:
    """A HF tokenizers JSON of the canonical tokenizer: BPE with its vocabulary, merges and
    options, its pre-tokenizer and no normalizer or post-processor. pipeline=True leaves out the
    added tokens too (the encoder's pipeline: nothing adds, drops or rewrites text); otherwise
    they are listed, so that canonical_bpe of the result is `canon` again."""
    vocab = {t: i for i, t in enumerate(canon["tokens"]) if t is not None}
    model = dict(
        canon["bpe"], type="BPE", dropout=None, vocab=vocab, merges=[list(m) for m in canon["merges"]]
    )
    added = (
        []
        if pipeline
        else [
            {
                "id": i,
                "content": c,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, c in canon["added"]
        ]
    )
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": canon["pre_tokenizer"],
            "post_processor": None,
            "decoder": None,
            "model": model,
        }
    )


def canonical(tokenizer) -> dict:
    """The canonical form of a tokenizer object (what a model file stores)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "bytes", "version": 1}
    return tokenizer.canonical


def from_canonical(canon: dict):
    """The tokenizer a model file describes."""
    if canon.get("kind") == "bytes" and canon.get("version") == 1:
        return ByteTokenizer()
    return ByteLevelBPE(canon)


def from_json(tokenizer_json: str | None):
    """The tokenizer for a loaded model: byte-level BPE from its JSON, or bytes when there is none."""
    if tokenizer_json is None:
        return ByteTokenizer()
    return ByteLevelBPE(tokenizer_json)


__all__ = [
    "ByteTokenizer",
    "ByteLevelBPE",
    "UnsupportedTokenizer",
    "from_json",
    "canonical_bpe",
    "canonical",
    "from_canonical",
    "hf_json",
    "gpt2_bytes_to_unicode",
]
