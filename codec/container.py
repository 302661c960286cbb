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

Version 3, the keyed form (what a store hands its readers for a compact block, below; never
written to a file or a store): the version 2 layout with the checksum replaced by the 32-byte
blake3 digest of the plaintext (the block's key in the store):

    4      magic  b"LMFZ"
    1      format version 3
    1      codec id
    1-10   varint: plaintext length
    32     key: blake3-256 of the plaintext (a stronger check than xxh3: a decode is verified
           against it exactly as against a version 2 checksum, by registry.verify)
    8      model fingerprint (codec id LM only)
    ...    payload

The compact form (COMPACT_TAG; at rest in a store's `blocks` table only, llmfs/store.py format 3,
never in an `llmfs compress` file): an LM container less everything the store already knows:

    1      COMPACT_TAG (0x01; a full container starts with b"L": the two never collide)
    1-10   varint: the store-local model number (the store's `modelnums` table maps it to the
           8-byte fingerprint)
    1-10   varint: plaintext length
    ...    payload, exactly as in the version 2 container it was made from

4 bytes for an 8 KiB block where version 2 has 24. The compact form of a block whose payload
names a store dictionary (COMPACT_DICT_TAG; store format 4) also drops the dictionary's 8-byte id
from the payload, for a store-local dictionary number:

    1      COMPACT_DICT_TAG (0x02)
    1-10   varint: the store-local model number
    1-10   varint: the store-local dictionary number (the store's `dictnums` table maps it to the
           8-byte dictionary id)
    1-10   varint: plaintext length
    ...    payload less the 8 bytes of the dictionary id (the LM codec says where they stood:
           codec/lm/codec.py, dictionary_offset — the same offset in the payload with or without
           them, since only the bytes before the id decide it)

5 bytes for 12: 7 bytes less on each block that continues a dictionary. Where the id lives: in
the payload, as the codec writes it — the store only keeps it as a number at rest, and `expand`
puts the id back, so the keyed container every reader gets (and any block copied out of the
store, through its read methods) names its dictionary by id, exactly as a standalone container
does, and decodes wherever that dictionary is known. A number names nothing outside its store;
an id does: that is why the number never reaches a reader. What is dropped and why it is safe:
  * the magic and version: the store knows it holds containers; the tag is the version;
  * the codec id: only LM containers are made compact (raw and zstd blocks are large, their
    header is under 1 % of them, and a raw block is read in place from the store's map);
  * the xxh3 checksum: the block's key is blake3 of its plaintext, and `expand(blob, key,
    fingerprint)` puts the key into the keyed form that every reader decodes — the FUSE read path,
    the decode cache, readahead/prefetch, compaction's verify, fsck, the cluster workers all get
    their blobs from the store's read methods, which expand. A compact blob that reaches a reader
    unexpanded fails read_header (CompactOutsideStore), so a path that forgot to expand gets an
    error, never unverified bytes;
  * the fingerprint: a store holds a handful of models; the number is mapped back by the store,
    and a number the store does not know is an error (ModelMismatch), never a guess;
  * (COMPACT_DICT_TAG) the dictionary id: likewise, through the store's `dictnums`; a number the
    store does not know leaves the block unexpandable (read as damaged), never guessed.
The length stays: a decode needs it before the first token (the payload's token count does not
give the byte length), and it bounds the work a damaged block can cause.

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
  * readers refuse versions they do not know with UnsupportedVersion (we never guess a format);
  * a keyed (version 3) container decodes to `length` bytes whose blake3 is `key`, or raises;
  * expand(compact(c, n), blake3(plaintext of c), fingerprint of n) has c's codec, length,
    fingerprint and payload: compacting loses nothing a store cannot give back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3
import xxhash

MAGIC = b"LMFZ"
FORMAT_VERSION = 2
FINGERPRINT_SIZE = 8
KEYED_VERSION = 3  # in memory only: a store's compact block handed to its readers
KEY_SIZE = 32  # blake3-256, the store's block key
COMPACT_TAG = 0x01  # first byte of a compact (store, at rest) container
COMPACT_DICT_TAG = 0x02  # the same, with a store-local dictionary number (store format 4)
COMPACT_TAGS = (COMPACT_TAG, COMPACT_DICT_TAG)
DICTIONARY_ID_SIZE = 8  # codec/lm/dictionary.py's ID_SIZE: the bytes a dictionary number replaces
_LM = 2  # registry.LM: the one codec whose containers are made compact
_CHECKSUM = struct.Struct(">Q")
_V1_HEAD = struct.Struct(">4sBBHQQ")  # version 1: magic, version, codec, flags, length, checksum
_V1_FINGERPRINT_SIZE = 16
_MAX_VARINT = 10  # 64 bits in 7-bit groups
MAX_HEADER_SIZE = 4 + 1 + 1 + _MAX_VARINT + _CHECKSUM.size + FINGERPRINT_SIZE  # 32 (version 2)
# Enough bytes for the header of every readable version (version 1 LM: 40): what peek_header reads.
KEYED_HEADER_SIZE = 4 + 1 + 1 + _MAX_VARINT + KEY_SIZE + FINGERPRINT_SIZE  # 56 (version 3)
HEADER_PEEK_SIZE = max(MAX_HEADER_SIZE, _V1_HEAD.size + _V1_FINGERPRINT_SIZE, KEYED_HEADER_SIZE)


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


class CompactOutsideStore(ContainerError):
    """A store's compact container read without its store (which must expand it first)."""


class Quarantined(ContainerError):
    """The block was found damaged and quarantined (fsck --repair): it reads as an error for good."""


def checksum(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def key(data) -> bytes:
    """blake3-256 of the plaintext: a store's block key, and the check of a keyed container."""
    return blake3.blake3(data).digest()


@dataclass(frozen=True)
class Header:
    codec_id: int
    length: int
    checksum: int
    fingerprint: bytes  # FINGERPRINT_SIZE bytes for codecs with a model, b"" for the others
    payload_offset: int
    key: bytes = b""  # keyed containers (version 3): blake3 of the plaintext; checksum is then 0


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
    if len(buf) and buf[0] in COMPACT_TAGS:
        raise CompactOutsideStore(
            "a store's compact container its store could not expand (a damaged header or a "
            "model number the store does not know), or read without its store"
        )
    if bytes(buf[:4]) != MAGIC[: len(buf[:4])]:
        raise BadMagic("not an llmfs container (bad magic)")
    if len(buf) < 6:
        raise Truncated(f"container truncated: {len(buf)} bytes, the header needs more")
    version, codec_id = buf[4], buf[5]
    if version == 1:
        return _read_v1(buf, has_fingerprint)
    if version not in (FORMAT_VERSION, KEYED_VERSION):
        raise UnsupportedVersion(
            f"container format version {version} is not supported (this llmfs reads versions 1 "
            f"to {KEYED_VERSION}); upgrade llmfs"
        )
    length, pos = read_varint(buf, 6, "container length field")
    model = FINGERPRINT_SIZE if has_fingerprint(codec_id) else 0
    check = KEY_SIZE if version == KEYED_VERSION else _CHECKSUM.size
    end = pos + check + model
    if len(buf) < end:
        raise Truncated(f"container truncated: {len(buf)} bytes, the header needs {end}")
    fingerprint = bytes(buf[end - model : end])
    if version == KEYED_VERSION:
        return Header(codec_id, length, 0, fingerprint, end, bytes(buf[pos : pos + KEY_SIZE]))
    (csum,) = _CHECKSUM.unpack_from(buf, pos)
    return Header(codec_id, length, csum, fingerprint, end)


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


# -- the store's compact form -------------------------------------------------------------------


def compact_size(length: int, model_number: int, dictionary_number: int | None = None) -> int:
    """Header bytes of a compact container (the payload follows them); with a dictionary number,
    less the DICTIONARY_ID_SIZE bytes it takes out of the payload (the net change)."""
    size = 1 + len(varint(model_number)) + len(varint(length))
    if dictionary_number is not None:
        size += len(varint(dictionary_number)) - DICTIONARY_ID_SIZE
    return size


def compact(head: Header, blob, model_number: int, dictionary: tuple[int, int] | None = None) -> bytes:
    """The compact form of the LM container `blob` (whose parsed header is `head`), naming its
    model by the store-local `model_number`. The caller (the store) guarantees that the block's
    key is blake3 of the plaintext this container encodes: that is what replaces the checksum.
    `dictionary`: (store-local dictionary number, offset of the dictionary id in the payload):
    the id is cut out of the payload and the number written (COMPACT_DICT_TAG)."""
    if head.codec_id != _LM or not head.fingerprint:
        raise ValueError("only LM containers have a compact form")
    payload = memoryview(blob)[head.payload_offset :]
    if dictionary is None:
        return b"".join((bytes((COMPACT_TAG,)), varint(model_number), varint(head.length), payload))
    number, at = dictionary
    if not 0 < at <= len(payload) - DICTIONARY_ID_SIZE:
        raise ValueError("the dictionary id is not inside the payload")
    return b"".join(
        (
            bytes((COMPACT_DICT_TAG,)),
            varint(model_number),
            varint(number),
            varint(head.length),
            payload[:at],
            payload[at + DICTIONARY_ID_SIZE :],
        )
    )


def compact_fields(blob) -> tuple[int, int | None, int, int]:
    """(model number, dictionary number or None, plaintext length, payload offset) of a compact
    container; BadMagic, Truncated or ChecksumMismatch if those fields are damaged."""
    buf = memoryview(blob)[: 1 + 3 * _MAX_VARINT]
    if not len(buf) or buf[0] not in COMPACT_TAGS:
        raise BadMagic("not a compact store container")
    number, pos = read_varint(buf, 1, "compact container's model number")
    dictionary = None
    if buf[0] == COMPACT_DICT_TAG:
        dictionary, pos = read_varint(buf, pos, "compact container's dictionary number")
    length, pos = read_varint(buf, pos, "compact container's length field")
    return number, dictionary, length, pos


def compact_head(blob) -> tuple[int, int, int]:
    """(model number, plaintext length, payload offset) of a compact container (either tag)."""
    number, _dictionary, length, pos = compact_fields(blob)
    return number, length, pos


def keyed_header(length: int, block_key: bytes, fingerprint: bytes, codec_id: int = _LM) -> bytes:
    """The header of a keyed (version 3) container."""
    if len(block_key) != KEY_SIZE or len(fingerprint) != FINGERPRINT_SIZE:
        raise ValueError("a keyed LM container needs a 32-byte key and an 8-byte fingerprint")
    return b"".join((MAGIC, bytes((KEYED_VERSION, codec_id)), varint(length), block_key, fingerprint))


def expand(blob, block_key: bytes, fingerprint: bytes, dictionary: tuple[bytes, int] | None = None) -> bytes:
    """The keyed (version 3) container of the compact container `blob`, stored under
    `block_key`, whose model number maps to `fingerprint`: what every reader decodes.
    `dictionary` (COMPACT_DICT_TAG): (the id its dictionary number maps to, the offset in the
    payload where the id goes back)."""
    _number, number, length, pos = compact_fields(blob)
    payload = memoryview(blob)[pos:]
    head = keyed_header(length, block_key, fingerprint)
    if number is None:
        return head + bytes(payload)
    if dictionary is None or len(dictionary[0]) != DICTIONARY_ID_SIZE:
        raise ModelMismatch("a compact container's dictionary number needs its dictionary id")
    did, at = dictionary
    if not 0 < at <= len(payload):
        raise Truncated("a compact container's payload ends before its dictionary id")
    return b"".join((head, payload[:at], did, payload[at:]))
