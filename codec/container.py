"""The container: the one byte format every stored block and every `llmfs compress` output uses.

Layout (all integers big-endian):

    offset  size  field
    0       4     magic  b"LMFZ"
    4       1     format version (FORMAT_VERSION)
    5       1     codec id (registry.py; permanent, never reused)
    6       2     flags, reserved: must be 0 in version 1
    8       8     original (plaintext) length in bytes
    16      8     checksum: xxh3_64 of the plaintext
    24      16    model fingerprint — only when the codec needs a model (codec id LM);
                  absent for raw and zstd
    24|40   ...   payload, codec-specific (the LM codec's payload starts with its segment table)

Invariants:
  * a container decodes to exactly `length` bytes whose xxh3_64 equals `checksum`, or it raises a
    ContainerError subclass — never wrong bytes;
  * raw and zstd containers are HEADER_SIZE (24) bytes larger than their payload; that is the whole
    growth a block that does not compress can suffer;
  * version 1 readers refuse any other version with UnsupportedVersion (we never guess a format).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"LMFZ"
FORMAT_VERSION = 1
FINGERPRINT_SIZE = 16
_HEAD = struct.Struct(">4sBBHQQ")
HEADER_SIZE = _HEAD.size  # 24


class ContainerError(Exception):
    """A container cannot be decoded. The message says why in words a user can act on."""


class BadMagic(ContainerError):
    pass


class Truncated(ContainerError):
    pass


class UnsupportedVersion(ContainerError):
    pass


class UnknownCodec(ContainerError):
    pass


class ModelMismatch(ContainerError):
    pass


class ChecksumMismatch(ContainerError):
    pass


def checksum(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Header:
    codec_id: int
    length: int
    checksum: int
    fingerprint: bytes  # b"" for codecs without a model
    payload_offset: int


def pack(codec_id: int, data_length: int, data_checksum: int, payload: bytes,
         fingerprint: bytes = b"") -> bytes:
    if fingerprint and len(fingerprint) != FINGERPRINT_SIZE:
        raise ValueError(f"model fingerprint must be {FINGERPRINT_SIZE} bytes")
    return b"".join((_HEAD.pack(MAGIC, FORMAT_VERSION, codec_id, 0, data_length, data_checksum),
                     fingerprint, payload))


def read_header(buf: bytes | memoryview, has_fingerprint) -> Header:
    """Parse and validate the header. `has_fingerprint(codec_id) -> bool` comes from the registry;
    it raises UnknownCodec for ids it does not know."""
    if len(buf) < HEADER_SIZE:
        if bytes(buf[:4]) != MAGIC[:len(buf[:4])]:
            raise BadMagic("not an llmfs container (bad magic)")
        raise Truncated(f"container truncated: {len(buf)} bytes, header needs {HEADER_SIZE}")
    magic, version, codec_id, flags, length, csum = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC:
        raise BadMagic("not an llmfs container (bad magic)")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"container format version {version} is not supported (this llmfs reads version "
            f"{FORMAT_VERSION}); upgrade llmfs")
    if flags != 0:
        raise UnsupportedVersion(f"container uses flags {flags:#x} unknown to format version 1")
    offset = HEADER_SIZE
    fingerprint = b""
    if has_fingerprint(codec_id):
        if len(buf) < offset + FINGERPRINT_SIZE:
            raise Truncated("container truncated inside the model fingerprint")
        fingerprint = bytes(buf[offset:offset + FINGERPRINT_SIZE])
        offset += FINGERPRINT_SIZE
    return Header(codec_id, length, csum, fingerprint, offset)
