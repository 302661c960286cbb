"""The mount daemon's background work: the compaction thread and the control socket that
`llmfs compact` (and stats requests) talk to.

Threading: compaction runs on its own low-priority thread; each control request on its own thread.
`stop()` ends both; the daemon then closes the store while holding `shutdown_lock`, which the
compactor also takes around its (short) write transaction, so a batch that was still in the model
at unmount is dropped instead of writing to a closed store.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

from . import control
from .compact import inodes_under
from .compactor import Compactor
from .models import Models, store_spec
from .namespace import Filesystem

log = logging.getLogger("llmfs")


class Background:
    def __init__(self, fs: Filesystem, models: Models, compact_after: float | None):
        """compact_after: seconds before a block is compacted; None disables the thread (manual
        `llmfs compact` still works)."""
        self.fs = fs
        self.compactor = Compactor(fs.store, fs.registry, models.compaction_codec,
                                   store_spec(fs.store),
                                   compact_after if compact_after is not None else 0)
        self.automatic = compact_after is not None
        self.shutdown_lock = self.compactor.shutdown_lock
        self._control: control.ControlServer | None = None

    def start(self) -> None:
        self._control = control.ControlServer(self.fs.store.path, {
            "compact": self._compact, "stats": self._stats})
        if self.automatic:
            self.compactor.run_in_background()

    def _compact(self, req: dict, send) -> dict:
        inos = None
        if req.get("path") is not None:
            self.fs.flush_all()
            inos = inodes_under(self.fs.store, req["path"].encode(errors="surrogateescape"))
        elif req.get("now"):
            self.fs.flush_all()  # "now" includes what is still buffered
        hashes = self.compactor.candidates(0 if req.get("now") else None, inos)
        res = self.compactor.compact(hashes, lambda done, total: send({"done": done,
                                                                       "total": total}))
        self.fs.store.sync()  # `llmfs compact` returns when its result is durable
        return asdict(res)

    def _stats(self, req: dict, send) -> dict:
        cache = self.fs.cache
        return {"compaction": asdict(self.compactor.totals),
                "cache": cache.metrics() if hasattr(cache, "metrics") else {}}

    def stop(self) -> None:
        self.compactor.stop()
        if self._control is not None:
            self._control.close()
