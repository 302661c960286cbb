"""Codec registry: permanent one-byte ids, the model-free codecs, and verified encode/decode.

Ids are permanent: a stored container names its codec by id forever, so an id is never reused and
never renumbered. New codecs take the next free number.

    0  raw   payload is the plaintext
    1  zstd  payload is one zstd frame
    2  lm    language-model arithmetic coding (codec/lm); the container carries the model fingerprint

Threading: a Registry is shared by all FUSE worker threads. zstd (de)compressor objects are not
thread-safe, so each thread gets its own (thread-local), which also saves re-creating their context
on every block.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol

import zstandard

from . import container
from .container import ChecksumMismatch, ContainerError, Header, ModelMismatch, UnknownCodec

RAW = 0
ZSTD = 1
LM = 2
CODEC_NAMES = {RAW: "raw", ZSTD: "zstd", LM: "lm"}

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
    def __init__(self, zstd_level: int = ZSTD_LEVEL,
                 model_resolver: Callable[[bytes], ModelCodec] | None = None):
        self.zstd_level = zstd_level
        self._local = threading.local()
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
                f"container was made with model {fingerprint.hex()}, which is not loaded here")
        return codec

    # -- encode ---------------------------------------------------------------------------------
    def _zstd(self):
        local = self._local
        if not hasattr(local, "cctx"):
            local.cctx = zstandard.ZstdCompressor(level=self.zstd_level)
            local.dctx = zstandard.ZstdDecompressor()
        return local

    def encode(self, data: bytes, codecs: Iterable[int] = (ZSTD,),
               fingerprint: bytes | None = None) -> bytes:
        """Encode with each codec in `codecs` (and raw, always) and return the smallest container.
        For LM, `fingerprint` names the model to use."""
        data = bytes(data)
        csum = container.checksum(data)
        best_id, best_payload, best_fp = RAW, data, b""
        for cid in codecs:
            fp = b""
            if cid == ZSTD:
                payload = self._zstd().cctx.compress(data)
            elif cid == LM:
                if fingerprint is None:
                    raise ValueError("LM encoding needs a model fingerprint")
                payload, fp = self.model(fingerprint).encode(data), fingerprint
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

    def decode_many(self, blobs: list[bytes]) -> list[bytes]:
        """Decode containers; LM containers of one model go through the engine as one batch.
        Every result is checked against its stored length and checksum."""
        heads = [self.header(b) for b in blobs]
        out: list[bytes | None] = [None] * len(blobs)
        lm_groups: dict[bytes, list[int]] = {}
        for i, (blob, h) in enumerate(zip(blobs, heads)):
            payload = memoryview(blob)[h.payload_offset:]
            if h.codec_id == RAW:
                out[i] = bytes(payload)
            elif h.codec_id == ZSTD:
                try:
                    out[i] = self._zstd().dctx.decompress(payload, max_output_size=h.length)
                except zstandard.ZstdError as e:
                    raise ChecksumMismatch(f"zstd payload is corrupt: {e}") from None
            else:
                lm_groups.setdefault(h.fingerprint, []).append(i)
        for fp, idx in lm_groups.items():
            codec = self.model(fp)
            items = [(bytes(memoryview(blobs[i])[heads[i].payload_offset:]), heads[i].length)
                     for i in idx]
            for i, data in zip(idx, codec.decode_many(items)):
                out[i] = data
        for data, h in zip(out, heads):
            verify(data, h)
        return out  # type: ignore[return-value]


def peek_header(blob: bytes | memoryview) -> Header:
    """The header of a container, without decoding it. Pass the whole container (bytes or a buffer
    into the store's map): only its first container.HEADER_PEEK_SIZE bytes are read."""
    return container.read_header(memoryview(blob)[:container.HEADER_PEEK_SIZE], Registry._has_fingerprint)


def verify(data: bytes, h: Header) -> None:
    if len(data) != h.length:
        raise ChecksumMismatch(f"decoded {len(data)} bytes, container says {h.length}")
    if container.checksum(data) != h.checksum:
        raise ChecksumMismatch("decoded bytes do not match the stored checksum")


__all__ = ["Registry", "RAW", "ZSTD", "LM", "CODEC_NAMES", "ContainerError", "verify", "peek_header"]
