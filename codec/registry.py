"""Codec registry: permanent one-byte ids, the model-free codecs, and verified encode/decode.

Ids are permanent: a stored container names its codec by id forever, so an id is never reused and
never renumbered. New codecs take the next free number.

    0  raw   payload is the plaintext
    1  zstd  payload is one zstd frame
    2  lm    language-model arithmetic coding (codec/lm); the container carries the model fingerprint
    3  damaged  not a codec: a block that fsck --repair found damaged and quarantined. Its payload
             is the damaged container as it was found (kept for forensics, never decoded); its
             length is the block's plaintext length. Decoding it always raises Quarantined, so
             the block's range reads as EIO until the file is rewritten (a write of the same
             content heals every file that shares the block: llmfs/store.py set_block)

Damaged input: everything a container says is checked before it is trusted. A zstd frame is
decompressed into at most the container's stated length (never what the frame header claims), and
a decode can be bounded further by `max_length` (the store's block size): a container claiming
more is corrupt, so no stored byte can make a decode allocate or compute without bound. Any failure
of a payload to decode, whatever the decoder raised, becomes a ContainerError.

Threading: a Registry is shared by all FUSE worker threads. zstd (de)compressor objects are not
thread-safe, so each thread gets its own (thread-local), which also saves re-creating their context
on every block.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

import zstandard

from . import container
from .container import (
    ChecksumMismatch,
    ContainerError,
    Header,
    ModelMismatch,
    Quarantined,
    UnknownCodec,
)

RAW = 0
ZSTD = 1
LM = 2
DAMAGED = 3
CODEC_NAMES = {RAW: "raw", ZSTD: "zstd", LM: "lm", DAMAGED: "damaged"}

# zstd level of the write path. Level 3 is zstd's own default: on text it is within ~10 % of level 9
# at several times the speed, and cold data is re-encoded by the LM later anyway.
ZSTD_LEVEL = 3


class ModelCodec(Protocol):
    """What the registry needs from a codec that runs a model (codec/lm implements it)."""

    fingerprint: bytes  # container.FINGERPRINT_SIZE bytes: hash of weights + tokenizer + engine version

    def encode(self, data: bytes) -> bytes | None:
        """The payload, or None when the model cannot code this data."""

    def decode_many(self, items: list[tuple[bytes, int]]) -> list[bytes]:
        """Decode (payload, plaintext length) pairs in one batch."""


class Registry:
    def __init__(
        self, zstd_level: int = ZSTD_LEVEL, model_resolver: Callable[[bytes], ModelCodec] | None = None
    ):
        self.zstd_level = zstd_level
        # zstd contexts not in use, taken for one call and given back (list.pop and append are
        # atomic): not thread-local, because libfuse's worker threads are foreign to Python and
        # ctypes gives each callback a fresh thread state, so a thread-local context was made
        # anew (two contexts, ~15 µs, and the compressor's workspace) on every READ. At most as
        # many as calls ran at once.
        self._cctxs: list = []
        self._dctxs: list = []
        self._models: dict[bytes, ModelCodec] = {}
        self._resolver = model_resolver
        self._models_lock = threading.Lock()

    # -- models ---------------------------------------------------------------------------------
    def add_model(self, codec: ModelCodec) -> None:
        with self._models_lock:
            self._models[codec.fingerprint] = codec

    def model(self, fingerprint: bytes) -> ModelCodec:
        with self._models_lock:
            codec = self._models.get(fingerprint)
            if codec is None and self._resolver is not None:
                codec = self._resolver(fingerprint)
                self._models[fingerprint] = codec
        if codec is None:
            raise ModelMismatch(
                f"container was made with model {fingerprint.hex()}, which is not loaded here"
            )
        return codec

    # -- encode ---------------------------------------------------------------------------------
    def _compress(self, data) -> bytes:
        try:
            cctx = self._cctxs.pop()
        except IndexError:
            cctx = zstandard.ZstdCompressor(level=self.zstd_level)
        try:
            return cctx.compress(data)
        finally:
            self._cctxs.append(cctx)

    def encode(self, data: bytes, codecs: Iterable[int] = (ZSTD,), fingerprint: bytes | None = None) -> bytes:
        """Encode with each codec in `codecs` (and raw, always) and return the smallest container.
        For LM, `fingerprint` names the model to use."""
        data = memoryview(data)  # any buffer, read in place: the write path hands over its blocks uncopied
        csum = container.checksum(data)
        best_id, best_payload, best_fp = RAW, data, b""
        for cid in codecs:
            fp = b""
            if cid == ZSTD:
                payload = self._compress(data)
            elif cid == LM:
                if fingerprint is None:
                    raise ValueError("LM encoding needs a model fingerprint")
                payload, fp = self.model(fingerprint).encode(bytes(data)), fingerprint
                if payload is None:
                    continue
            elif cid == RAW:
                continue
            else:
                raise UnknownCodec(f"unknown codec id {cid}")
            if len(payload) + len(fp) < len(best_payload) + len(best_fp):
                best_id, best_payload, best_fp = cid, payload, fp
        return container.pack(best_id, len(data), csum, best_payload, best_fp)

    # -- decode ---------------------------------------------------------------------------------
    @staticmethod
    def _has_fingerprint(codec_id: int) -> bool:
        if codec_id not in CODEC_NAMES:
            raise UnknownCodec(f"container uses codec id {codec_id}, unknown to this llmfs")
        return codec_id == LM

    def header(self, blob: bytes) -> Header:
        return peek_header(blob)

    def decode(self, blob: bytes) -> bytes:
        return self.decode_many([blob])[0]

    def decode_many(self, blobs: list[bytes], max_length: int | None = None) -> list[bytes]:
        """Decode containers; LM containers of one model go through the engine as one batch.
        Every result is checked against its stored length and checksum. `max_length`: the most
        plaintext bytes any of them may hold (a block store's block size); a container that
        claims more is corrupt."""
        heads = [self.header(b) for b in blobs]
        out: list[bytes | None] = [None] * len(blobs)
        lm_groups: dict[bytes, list[int]] = {}
        for i, (blob, h) in enumerate(zip(blobs, heads)):
            if max_length is not None and h.length > max_length:
                raise ChecksumMismatch(f"container claims {h.length} bytes, more than a block ({max_length})")
            payload = memoryview(blob)[h.payload_offset :]
            if h.codec_id == RAW:
                out[i] = bytes(payload)
            elif h.codec_id == ZSTD:
                out[i] = self._unzstd(payload, h.length)
            elif h.codec_id == DAMAGED:
                raise Quarantined(
                    "this block was found damaged and quarantined by "
                    "`llmfs fsck --repair`; restore the file from a backup"
                )
            else:
                lm_groups.setdefault(h.fingerprint, []).append(i)
        for fp, idx in lm_groups.items():
            codec = self.model(fp)
            items = [(bytes(memoryview(blobs[i])[heads[i].payload_offset :]), heads[i].length) for i in idx]
            try:
                decoded = codec.decode_many(items)
            except ContainerError:
                raise
            except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
                # a payload the decoder chokes on is a damaged payload, not a bug to surface
                raise ChecksumMismatch(f"LM payload is corrupt: {e!r}") from None
            for i, data in zip(idx, decoded):
                out[i] = data
        for data, h in zip(out, heads):
            verify(data, h)
        return out  # type: ignore[return-value]

    def decode_into(self, blob, out: memoryview, start: int = 0, max_length: int | None = None) -> int:
        """Decode a raw or zstd container and copy its plaintext from byte `start` on into `out`
        (as much as fits); returns the bytes copied. The whole plaintext is checked against the
        container's length and checksum first, as in decode_many. A raw payload is checked and
        copied where it lies (a buffer into the store's map): one copy from the disk's pages to
        the reader. LM and quarantined containers go through decode_many (ValueError here)."""
        h = self.header(blob)
        if max_length is not None and h.length > max_length:
            raise ChecksumMismatch(f"container claims {h.length} bytes, more than a block ({max_length})")
        payload = memoryview(blob)[h.payload_offset :]
        if h.codec_id == RAW:
            data = payload
        elif h.codec_id == ZSTD:
            data = self._unzstd(payload, h.length)
        else:
            raise ValueError(
                f"decode_into decodes raw and zstd containers, not {CODEC_NAMES.get(h.codec_id)}"
            )
        verify(data, h)
        n = max(0, min(len(out), h.length - start))
        out[:n] = memoryview(data)[start : start + n]
        return n

    def _unzstd(self, payload: memoryview, length: int) -> bytes:
        """The zstd frame's content, at most `length` bytes: a frame that states its size (every
        frame llmfs writes) is decoded in one call into a buffer of that size, which zstd does not
        write past (a frame decoding to another size fails); one that does not is read in steps,
        the output growing only as it is produced and never past length + 1."""
        try:
            dctx = self._dctxs.pop()
        except IndexError:
            dctx = zstandard.ZstdDecompressor()
        try:
            claimed = zstandard.frame_content_size(payload)
            if claimed > length:  # -1: the frame does not say
                raise ChecksumMismatch(f"zstd frame claims {claimed} bytes, the container {length}")
            if claimed >= 0:
                return dctx.decompress(payload)
            reader = dctx.stream_reader(payload, read_size=1 << 16)
            parts, n = [], 0
            while n <= length:
                chunk = reader.read(length + 1 - n)
                if not chunk:
                    break
                parts.append(chunk)
                n += len(chunk)
        except zstandard.ZstdError as e:
            raise ChecksumMismatch(f"zstd payload is corrupt: {e}") from None
        finally:
            self._dctxs.append(dctx)
        if n > length:
            raise ChecksumMismatch(f"zstd payload holds more than the container's {length} bytes")
        return b"".join(parts)


def peek_header(blob: bytes | memoryview) -> Header:
    """The header of a container, without decoding it. Pass the whole container (bytes or a buffer
    into the store's map): only its first container.HEADER_PEEK_SIZE bytes are read."""
    return container.read_header(memoryview(blob)[: container.HEADER_PEEK_SIZE], Registry._has_fingerprint)


def verify(data: bytes, h: Header) -> None:
    """The decoded bytes against the container: its length, and its xxh3 checksum or (a keyed
    container: a store's compact block) the blake3 key of the block."""
    if len(data) != h.length:
        raise ChecksumMismatch(f"decoded {len(data)} bytes, container says {h.length}")
    if h.key:
        if container.key(data) != h.key:
            raise ChecksumMismatch("decoded bytes do not match the block's key (blake3)")
    elif container.checksum(data) != h.checksum:
        raise ChecksumMismatch("decoded bytes do not match the stored checksum")


__all__ = [
    "Registry",
    "RAW",
    "ZSTD",
    "LM",
    "DAMAGED",
    "CODEC_NAMES",
    "ContainerError",
    "verify",
    "peek_header",
]
