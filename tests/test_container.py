"""The container format (codec/container.py): pinned bytes of both versions, typed errors for every
truncation and for garbage, and the registry's round trip through it."""

from __future__ import annotations

import pytest
from llmfs.codec import container
from llmfs.codec.container import (
    FINGERPRINT_SIZE,
    MAX_HEADER_SIZE,
    BadMagic,
    ChecksumMismatch,
    ContainerError,
    Truncated,
    UnknownCodec,
    UnsupportedVersion,
)
from llmfs.codec.registry import LM, RAW, ZSTD, Registry, peek_header

DATA = b"hello, container\n"
CSUM = container.checksum(DATA)
FP = bytes(range(1, 9))
# Version 2 as written since 2026-11-30: these bytes must never change.
V2_RAW = bytes.fromhex("4c4d465a020011") + CSUM.to_bytes(8, "big") + DATA
# Version 1 (written until 2026-11-29): 24-byte fixed header, LM with a 16-byte fingerprint.
V1_LM = (
    bytes.fromhex("4c4d465a01020000")
    + (300).to_bytes(8, "big")
    + (77).to_bytes(8, "big")
    + FP
    + bytes(8)
    + b"payload"
)


def test_pinned_version_2_bytes():
    assert container.pack(RAW, len(DATA), CSUM, DATA) == V2_RAW
    assert container.header_size(len(DATA)) == len(V2_RAW) - len(DATA) == 15
    assert container.header_size(64 * 1024) == 17
    assert container.header_size(64 * 1024, has_fingerprint=True) == 25
    assert Registry().decode(V2_RAW) == DATA


def test_version_1_still_reads():
    h = peek_header(V1_LM)
    assert (h.codec_id, h.length, h.checksum, h.fingerprint) == (LM, 300, 77, FP)
    assert V1_LM[h.payload_offset :] == b"payload"
    v1_raw = bytes.fromhex("4c4d465a01000000") + len(DATA).to_bytes(8, "big") + CSUM.to_bytes(8, "big") + DATA
    assert Registry().decode(v1_raw) == DATA


def test_version_2_lm_header_fields():
    blob = container.pack(LM, 1 << 40, 5, b"xyz", FP)
    h = peek_header(blob)
    assert (h.codec_id, h.length, h.checksum, h.fingerprint) == (LM, 1 << 40, 5, FP)
    assert blob[h.payload_offset :] == b"xyz"
    assert h.payload_offset == container.header_size(1 << 40, has_fingerprint=True)
    with pytest.raises(ValueError):
        container.pack(LM, 1, 5, b"", b"short")


@pytest.mark.parametrize("blob", [V2_RAW, container.pack(LM, 9, 9, b"p", FP), V1_LM])
def test_every_truncated_header_is_a_typed_error(blob):
    end = peek_header(blob).payload_offset
    for n in range(end):
        with pytest.raises((Truncated, BadMagic)):
            peek_header(blob[:n])
    assert end <= MAX_HEADER_SIZE + 8  # version 1 LM: 40


def test_garbage_is_a_typed_error():
    with pytest.raises(BadMagic):
        peek_header(b"PK\x03\x04" + bytes(40))
    with pytest.raises(UnsupportedVersion, match="version 4"):
        peek_header(b"LMFZ\x04\x00" + bytes(30))
    with pytest.raises(UnknownCodec):
        peek_header(b"LMFZ\x02\xee\x01" + bytes(30))
    with pytest.raises(ChecksumMismatch, match="length"):
        peek_header(b"LMFZ\x02\x00" + b"\xff" * 30)
    v1_flags = bytearray(V1_LM)
    v1_flags[7] = 1
    with pytest.raises(UnsupportedVersion, match="flags"):
        peek_header(bytes(v1_flags))


def test_registry_round_trip_and_wrong_checksum():
    reg = Registry()
    text = b"the quick brown fox " * 200
    blob = reg.encode(text, codecs=(ZSTD,))
    assert peek_header(blob).codec_id == ZSTD and reg.decode(blob) == text
    assert len(blob) < len(text) // 10
    bad = bytearray(V2_RAW)
    bad[-1] ^= 1
    with pytest.raises(ChecksumMismatch):
        reg.decode(bytes(bad))
    incompressible = bytes(range(256))
    blob = reg.encode(incompressible, codecs=(ZSTD,))
    assert peek_header(blob).codec_id == RAW
    assert len(blob) == len(incompressible) + container.header_size(256)
    assert issubclass(ChecksumMismatch, ContainerError) and FINGERPRINT_SIZE == 8


# ---------------------------------------------------------------- the store's compact form
class _ZlibModel:
    """A model codec stand-in (registry ModelCodec): zlib payloads, decode errors as ValueError
    (what the registry turns into ChecksumMismatch, as for the real LM codec's payload errors)."""

    def __init__(self, fingerprint: bytes, salt: int = 0):
        self.fingerprint, self.salt = fingerprint, salt

    def encode(self, data: bytes) -> bytes:
        import zlib

        return zlib.compress(bytes(b ^ self.salt for b in data), 9)

    def decode_many(self, items):
        import zlib

        try:
            return [bytes(b ^ self.salt for b in zlib.decompress(p)) for p, _n in items]
        except zlib.error as e:
            raise ValueError(str(e)) from None


TEXT = b"compact containers drop what the store knows\n" * 40
OTHER_FP = b"otherfp!"


def _lm_registry():
    reg = Registry()
    reg.add_model(_ZlibModel(FP))
    reg.add_model(_ZlibModel(OTHER_FP, salt=0x20))  # decodes FP's payloads to other bytes
    return reg


def test_compact_round_trip_and_pinned_layout():
    reg = _lm_registry()
    full = reg.encode(TEXT, (LM,), FP)
    head = peek_header(full)
    small = container.compact(head, full, 0)
    assert small[:3] == bytes((container.COMPACT_TAG, 0)) + container.varint(len(TEXT))[:1]
    assert len(small) == len(full) - container.header_size(len(TEXT), True) + 4
    assert container.compact_head(small) == (0, len(TEXT), 4)
    assert container.compact_size(len(TEXT), 0) == 4
    key = container.key(TEXT)
    keyed = container.expand(small, key, FP)
    kh = peek_header(keyed)
    assert (kh.codec_id, kh.length, kh.fingerprint, kh.key) == (LM, len(TEXT), FP, key)
    assert reg.decode(keyed) == TEXT
    assert container.compact(kh, keyed, 7)[1] == 7  # a keyed container compacts the same way
    with pytest.raises(ValueError):
        container.compact(peek_header(V2_RAW), V2_RAW, 0)  # only LM containers


def test_compact_container_outside_its_store_is_an_error():
    reg = _lm_registry()
    full = reg.encode(TEXT, (LM,), FP)
    small = container.compact(peek_header(full), full, 0)
    with pytest.raises(container.CompactOutsideStore):
        peek_header(small)
    with pytest.raises(container.CompactOutsideStore):
        reg.decode(small)


def test_keyed_container_checks_the_key():
    reg = _lm_registry()
    full = reg.encode(TEXT, (LM,), FP)
    small = container.compact(peek_header(full), full, 0)
    wrong_key = container.key(TEXT + b"x")
    with pytest.raises(ChecksumMismatch, match="key"):
        reg.decode(container.expand(small, wrong_key, FP))
    # a wrong store-local model number mapped to another model: its bytes fail the key
    with pytest.raises(ChecksumMismatch):
        reg.decode(container.expand(small, container.key(TEXT), OTHER_FP))
    with pytest.raises(container.ModelMismatch):  # ... or to a model not loaded here
        reg.decode(container.expand(small, container.key(TEXT), b"unknown!"))


def test_every_damaged_byte_of_a_compact_container_is_an_error():
    """Each byte of a compact container flipped (as the store would expand it: its key and the
    model its number names, 0 -> FP, 1 -> OTHER_FP, else unknown): a ContainerError, never bytes
    other than the plaintext."""
    reg = _lm_registry()
    full = reg.encode(TEXT, (LM,), FP)
    small = container.compact(peek_header(full), full, 0)
    key, models = container.key(TEXT), {0: FP, 1: OTHER_FP}
    for i in range(len(small)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(small)
            bad[i] ^= flip
            try:
                number, _length, _pos = container.compact_head(bad)
                if number not in models:
                    raise container.ModelMismatch(f"no model number {number}")
                got = reg.decode_many([container.expand(bad, key, models[number])], 1 << 16)[0]
            except ContainerError:
                continue
            assert got == TEXT, (i, flip)


def test_zstd_contexts_are_reused_across_threads_and_sizeless_frames_decode():
    """The registry keeps its zstd contexts in a pool, not per thread: FUSE's worker threads get
    a fresh Python thread state per request, so thread-local contexts were made on every READ."""
    import threading

    import zstandard
    from llmfs.codec.registry import ChecksumMismatch

    r = Registry()
    data = b"small file contents\n" * 60
    blob = r.encode(data, (ZSTD,))
    assert peek_header(blob).codec_id == ZSTD

    def one() -> None:
        assert r.decode(blob) == data
        assert r.encode(data, (ZSTD,)) == blob

    for _ in range(5):  # one thread after another: one context of each kind serves them all
        t = threading.Thread(target=one)
        t.start()
        t.join()
    assert len(r._dctxs) == 1 and len(r._cctxs) == 1
    h = peek_header(blob)
    # a frame that does not state its size is read in steps, and bounded by the container's length
    sizeless = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert r._unzstd(memoryview(sizeless), len(data)) == data
    with pytest.raises(ChecksumMismatch):
        r._unzstd(memoryview(sizeless), len(data) - 1)
    with pytest.raises(ChecksumMismatch):  # a frame that claims more than the container
        r._unzstd(memoryview(blob)[h.payload_offset :], h.length - 1)
