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
    with pytest.raises(UnsupportedVersion, match="version 3"):
        peek_header(b"LMFZ\x03\x00" + bytes(30))
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
