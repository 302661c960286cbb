"""Serve a store through FUSE with the fake LM of tests/fake_model.py, whose decodes wait (holding
the one engine lock, as the real engine does) until a gate file exists: a mounted test can hold
any number of cold LM reads in flight and look at what else still answers.

    python -m tests.slow_lm_daemon STORE MOUNTPOINT GATE_FILE
"""

from __future__ import annotations

import os
import sys
import time

from llmfs.cache import DecodeCache, Readahead
from llmfs.codec import Registry

from llmfs.fuseops import FUSE, Operations
from llmfs.mount import BASE_OPTIONS
from llmfs.namespace import Filesystem
from llmfs.store import Store

from .fake_model import SlowZlibModel

GATE_TIMEOUT = 60.0


class GatedModel(SlowZlibModel):
    def __init__(self, gate: str):
        super().__init__()
        self.gate = gate

    def decode_many(self, items):
        with self.engine_lock:
            end = time.monotonic() + GATE_TIMEOUT
            while not os.path.exists(self.gate) and time.monotonic() < end:
                time.sleep(0.02)
            return [__import__("zlib").decompress(p) for p, _n in items]


def main() -> None:
    store_path, mountpoint, gate = sys.argv[1:4]
    store = Store(store_path)
    registry = Registry()
    registry.add_model(GatedModel(gate))
    fs = Filesystem(store, registry, DecodeCache(16 << 20), readahead=Readahead())
    ops = Operations(fs, on_destroy=fs.flush_all)
    try:
        FUSE(
            ops,
            mountpoint,
            foreground=True,
            nothreads=False,
            **dict(BASE_OPTIONS, fsname=store.path, subtype="llmfs-test"),
        )
    finally:
        fs.flush_all()
        fs.cache.close(timeout=1)
        store.close()


if __name__ == "__main__":
    main()
