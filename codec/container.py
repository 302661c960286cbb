"""The container: the one byte format every stored block and every `llmfs compress` output uses.

Layout, format version 2 (the version written; varint = unsigned LEB128, at most 10 bytes, the
other integers big-endian):

    size   field
    4      magic  b"LMFZ"
    1      format version (FORMAT_VERSION = 2)
    1      codec id (registry.py; permanent, never reused)
    1-10   varint: original (plaintext) length in bytes
    8      checksum: xxh3_64 of the plaintext
    8      model fingerprint — only when the codec needs a model (codec id LM): the codec's
           fingerprint, FINGERPRINT_SIZE bytes; absent for raw and zstd
    ...    payload, codec-specific (the LM codec's payload starts with its segment table)

Version 1 (read, never written again): magic, version 1, codec id, u16 flags (0), u64 length,
u64 checksum, then for LM a 16-byte fingerprint whose first 8 bytes are the codec's fingerprint
of today (codec/lm: the first 8 bytes of the same blake2b-128 digest), then the payload — 40 header
bytes on an LM container where version 2 has 25 for a 64 KiB block. Version 2 exists because those
15 bytes are a noticeable fraction of a well-compressed LM block. Every version ever written stays
readable (docs/design.md, "Versions and compatibility").

Why these sizes: the 64-bit checksum is what stands between a decoding bug (or a wrong model, or a
garbled block) and wrong bytes, so it keeps all 64 bits. The fingerprint only has to tell apart
the models one store or one user has (the checksum still catches a collision): 64 bits is plenty.

Invariants:
  * a container decodes to exactly `length` bytes whose xxh3_64 equals `checksum`, or it raises a
    ContainerError subclass — never wrong bytes;
  * raw and zstd containers are header_size(length) bytes larger than their payload (17 for a
    64 KiB block, at most MAX_HEADER_SIZE): that is the whole growth a block that does not
    compress can suffer;
  * Header.fingerprint is FINGERPRINT_SIZE bytes for LM containers of either version, b"" for
    raw and zstd;
  * readers refuse versions they do not know with UnsupportedVersion (we never guess a format).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"LMFZ"
FORMAT_VERSION = 2
FINGERPRINT_SIZE = 8
_CHECKSUM = struct.Struct(">Q")
_V1_HEAD = struct.Struct(">4sBBHQQ")  # version 1: magic, version, codec, flags, length, checksum
_V1_FINGERPRINT_SIZE = 16
_MAX_VARINT = 10  # 64 bits in 7-bit groups
MAX_HEADER_SIZE = 4 + 1 + 1 + _MAX_VARINT + _CHECKSUM.size + FINGERPRINT_SIZE  # 32 (version 2)
# Enough bytes for the header of every readable version (version 1 LM: 40): what peek_header reads.
HEADER_PEEK_SIZE = max(MAX_HEADER_SIZE, _V1_HEAD.size + _V1_FINGERPRINT_SIZE)


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


class Quarantined(ContainerError):
    """The block was found damaged and quarantined (fsck --repair): it reads as an error for good."""


def checksum(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Header:
    codec_id: int
    length: int
    checksum: int
    fingerprint: bytes  # FINGERPRINT_SIZE bytes for codecs with a model, b"" for the others
    payload_offset: int


def varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, low first, high bit set on all but the last byte. The
    container's length and the LM payload's segment table use it."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(buf, pos: int, where: str) -> tuple[int, int]:
    """(value, position after it) of the varint at buf[pos]; Truncated if buf ends inside it,
    ChecksumMismatch if it runs past 64 bits. `where` names the field in the messages."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise Truncated(f"{where} truncated")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 7 * _MAX_VARINT:
            raise ChecksumMismatch(f"{where} is corrupt: malformed varint")


def header_size(length: int, has_fingerprint: bool = False) -> int:
    """Bytes a version 2 header takes for a plaintext of `length` bytes."""
    return 6 + len(varint(length)) + _CHECKSUM.size + (FINGERPRINT_SIZE if has_fingerprint else 0)


def pack(
    codec_id: int, data_length: int, data_checksum: int, payload: bytes, fingerprint: bytes = b""
) -> bytes:
    if fingerprint and len(fingerprint) != FINGERPRINT_SIZE:
        raise ValueError(f"model fingerprint must be {FINGERPRINT_SIZE} bytes")
    return b"".join(
        (
            MAGIC,
            bytes((FORMAT_VERSION, codec_id)),
            varint(data_length),
            _CHECKSUM.pack(data_checksum),
            fingerprint,
            payload,
        )
    )


def read_header(buf: bytes | memoryview, has_fingerprint) -> Header:
    """Parse and validate the header (MAX_HEADER_SIZE bytes of the container suffice).
    `has_fingerprint(codec_id) -> bool` comes from the registry; it raises UnknownCodec for ids it does
    not know."""
    buf = memoryview(buf)
    if bytes(buf[:4]) != MAGIC[: len(buf[:4])]:
        raise BadMagic("not an llmfs container (bad magic)")
    if len(buf) < 6:
        raise Truncated(f"container truncated: {len(buf)} bytes, the header needs more")
    version, codec_id = buf[4], buf[5]
    if version == 1:
        return _read_v1(buf, has_fingerprint)
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"container format version {version} is not supported (this llmfs reads versions 1 "
            f"and {FORMAT_VERSION}); upgrade llmfs"
        )
    length, pos = read_varint(buf, 6, "container length field")
    model = FINGERPRINT_SIZE if has_fingerprint(codec_id) else 0
    end = pos + _CHECKSUM.size + model
    if len(buf) < end:
        raise Truncated(f"container truncated: {len(buf)} bytes, the header needs {end}")
    (csum,) = _CHECKSUM.unpack_from(buf, pos)
    return Header(codec_id, length, csum, bytes(buf[end - model : end]), end)


def _read_v1(buf: memoryview, has_fingerprint) -> Header:
    if len(buf) < _V1_HEAD.size:
        raise Truncated(f"container truncated: {len(buf)} bytes, header needs {_V1_HEAD.size}")
    _magic, _version, codec_id, flags, length, csum = _V1_HEAD.unpack_from(buf, 0)
    if flags != 0:
        raise UnsupportedVersion(f"container uses flags {flags:#x} unknown to format version 1")
    offset, fingerprint = _V1_HEAD.size, b""
    if has_fingerprint(codec_id):
        if len(buf) < offset + _V1_FINGERPRINT_SIZE:
            raise Truncated("container truncated inside the model fingerprint")
        fingerprint = bytes(buf[offset : offset + FINGERPRINT_SIZE])
        offset += _V1_FINGERPRINT_SIZE
    return Header(codec_id, length, csum, fingerprint, offset)
