"""The mount daemon's background work: the compaction thread and the control socket that
`llmfs compact` (and stats requests) talk to.

Threading: compaction runs on its own low-priority thread; each control request on its own thread.
`stop()` ends both; the daemon then closes the store while holding `shutdown_lock`, which the
compactor also takes around its (short) write transaction, so a batch that was still in the model
at unmount is dropped instead of writing to a closed store.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict

from . import control
from .compact import inodes_under
from .compactor import Compactor
from .models import Models, store_spec
from .namespace import Filesystem

log = logging.getLogger("llmfs")

# How often `llmfs compact` on a mount with a cluster gets each worker's bytes within a batch.
PROGRESS_SECONDS = 2.0


class Background:
    def __init__(self, fs: Filesystem, models: Models, compact_after: float | None, cluster=None):
        """compact_after: seconds before a block is compacted; None disables the thread (manual
        `llmfs compact` still works). cluster: a cluster.ClusterCoder that does the compactor's
        model work on a Ray cluster (and decodes cold reads there when that is faster), or None."""
        self.fs = fs
        self.models = models
        self.compactor = Compactor(
            fs.store,
            fs.registry,
            models.compaction_codec,
            store_spec(fs.store),
            compact_after if compact_after is not None else 0,
        )
        self.automatic = compact_after is not None
        self.cluster = cluster
        self.compactor.remote = cluster
        fs.remote = cluster  # cold reads too, when the cluster decodes faster (cluster.py)
        self.shutdown_lock = self.compactor.shutdown_lock
        self._control: control.ControlServer | None = None

    def start(self) -> None:
        if self.cluster is not None:  # connecting takes seconds to minutes: not on FUSE's thread
            threading.Thread(target=self.cluster.start, name="llmfs-cluster", daemon=True).start()
        self._control = control.ControlServer(
            self.fs.store.path, {"compact": self._compact, "stats": self._stats}
        )
        if self.automatic:
            self.compactor.run_in_background()

    def _compact(self, req: dict, send) -> dict:
        inos = None
        if req.get("path") is not None:
            self.fs.flush_all()
            inos = inodes_under(self.fs.store, req["path"].encode(errors="surrogateescape"))
        elif req.get("now"):
            self.fs.flush_all()  # "now" includes what is still buffered

        lock, last, finished = threading.Lock(), [0, 0], threading.Event()

        def progress(done: int, total: int) -> None:
            with lock:  # the compactor's thread and the ticker below share the connection
                last[:] = done, total
                line = {"done": done, "total": total}
                if self.cluster is not None:
                    line["cluster"] = self.cluster.progress()
                send(line)

        def tick() -> None:
            # the compactor reports after each batch (1 MiB: minutes on CPU workers); the bytes
            # each worker has encoded within the batch come in between
            while not finished.wait(PROGRESS_SECONDS):
                try:
                    progress(*last)
                except OSError:
                    return  # `llmfs compact` went away; the compaction goes on

        if self.cluster is not None:
            threading.Thread(target=tick, name="llmfs-compact-progress", daemon=True).start()
        try:
            if req.get("recode"):  # llmfs compact --recode: see compactor.py
                res = self.compactor.recode(inos, progress)
                if inos is None:
                    self.models.retire_unused()
            else:
                hashes = self.compactor.candidates(0 if req.get("now") else None, inos)
                res = self.compactor.compact(hashes, progress)
        finally:
            with lock:
                finished.set()
        self.fs.store.sync()  # `llmfs compact` returns when its result is durable
        return asdict(res)

    def _stats(self, req: dict, send) -> dict:
        cache = self.fs.cache
        return {
            "compaction": asdict(self.compactor.totals),
            "cache": cache.metrics() if cache is not None else {},
            **({"cluster": self.cluster.stats()} if self.cluster is not None else {}),
        }

    def stop(self) -> None:
        self.compactor.stop()
        if self._control is not None:
            self._control.close()
        if self.cluster is not None:
            self.cluster.close()
