"""The store's language models: which model compacts new blocks, and how a block coded by any model
the store has used is decoded again.

A store names its model at mkfs (`meta.model`; "" = the default model). Every LM block's container
carries the model's fingerprint, and the store's `models` table maps each fingerprint ever used to
the spec that loaded it — a concrete spec: the default model is recorded by its name
(codec.lm.DEFAULT_MODEL), so blocks keep decoding after a release changes the default.

Threading: models load lazily (seconds) on first use, once, under a lock; the loaded codec is shared.
"""
from __future__ import annotations

import logging
import threading

from llmfs.codec.container import ModelMismatch
from llmfs.codec.lm import DECODE_BATCH, DEFAULT_MODEL  # plain values: importing them loads no torch

from .store import Store

log = logging.getLogger("llmfs")

# The engine's own threads (codec/lm/codec.py; --threads N). They never spin-wait (torch's OpenMP
# threads did, which on a loaded 2-core machine made the model many times slower, so torch keeps
# one), take work in chunks from a shared counter and inherit the compactor thread's nice 19; but
# each call joins its workers, and on an oversubscribed machine a worker may wait a scheduler slice
# before it runs at all, per GEMM call. One thread by default until the kernels stop waiting for
# workers that never got a chunk (docs/design.md, "Threading and locks").
THREADS = 1


def store_spec(store: Store) -> str:
    return store.model_spec or DEFAULT_MODEL


class Models:
    def __init__(self, store: Store, threads: int | None = THREADS, batch: int = DECODE_BATCH,
                 device: str = "auto"):
        self.store = store
        self.threads, self.batch, self.device = threads, batch, device
        self._lock = threading.Lock()
        self._codecs: dict[str, object] = {}

    def codec(self, spec: str):
        """The LM codec of `spec`, loaded on first use."""
        with self._lock:
            codec = self._codecs.get(spec)
            if codec is None:
                from llmfs.codec.lm import open_codec  # torch and the model: only when needed
                log.info("loading model %s", spec)
                codec = open_codec(spec, batch=self.batch, threads=self.threads,
                                   device=self.device)
                b = getattr(codec.engine, "backend", None)
                log.info("model %s on %s, %d engine threads%s", spec, codec.engine.device,
                         getattr(codec.engine, "threads", 1), f"; {b.describe()}" if b else "")
                self._codecs[spec] = codec
            return codec

    def compaction_codec(self):
        return self.codec(store_spec(self.store))

    def resolve(self, fingerprint: bytes):
        """For Registry(model_resolver=...): the codec that made blocks with this fingerprint."""
        with self.store.read() as t:
            spec = t.model_spec(fingerprint)
        if spec is None:
            raise ModelMismatch(f"blocks were coded by model {fingerprint.hex()}, which this "
                                f"store does not record")
        try:
            codec = self.codec(spec)
        except Exception as e:  # a missing file, an unsupported model: the block is unreadable
            raise ModelMismatch(f"model {spec} (needed by blocks {fingerprint.hex()}) cannot be "
                                f"loaded: {e}") from None
        if codec.fingerprint != fingerprint:
            raise ModelMismatch(f"model {spec} now has fingerprint {codec.fingerprint.hex()}, "
                                f"but blocks need {fingerprint.hex()}: was the model file "
                                f"replaced?")
        return codec
