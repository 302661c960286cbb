"""A stand-in for the LM codec at the registry's interface (codec/registry.py ModelCodec): zlib
payloads, and a decode that holds one lock for `delay` seconds per call, as the real engine's one
lock makes cold LM decodes take turns. For tests of what waits behind LM decoding (and what must
not), and of LM-only policies (prefetch), without a model."""

from __future__ import annotations

import threading
import time
import zlib

FINGERPRINT = b"fakezlib"


class SlowZlibModel:
    fingerprint = FINGERPRINT

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.engine_lock = threading.Lock()
        self.decoded: list[int] = []  # blocks per decode_many call

    def encode(self, data: bytes) -> bytes | None:
        return zlib.compress(data, 9)

    def decode_many(self, items: list[tuple[bytes, int]]) -> list[bytes]:
        with self.engine_lock:
            time.sleep(self.delay)
            self.decoded.append(len(items))
            try:
                return [zlib.decompress(p) for p, _n in items]
            except zlib.error as e:  # a damaged payload, as the LM codec reports one
                raise ValueError(f"zlib: {e}") from None


def compact_all(store, registry, model) -> None:
    """Re-encode every block of the store with `model` (what compaction does, minus its checks)."""
    from llmfs.codec.registry import LM

    registry.add_model(model)
    with store.read() as t:
        hashes = [h for h, _ in t.blocks()]
    plains = registry.decode_many([_blob(store, h) for h in hashes])
    with store.write() as t:
        for h, plain in zip(hashes, plains):
            t.replace_container(h, registry.encode(plain, (LM,), model.fingerprint))
            t.remove_pending(h)
        t.add_model(model.fingerprint, "fake-zlib")


def _blob(store, h):
    with store.read() as t:
        return t.container(h)
