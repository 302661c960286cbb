"""Prefetcher — one background thread that decodes blocks before they are read.

Fed by DecodeCache.prefetch(): the remaining blocks of a hot LM-compressed file, or the blocks Readahead
names for a sequential reader. The work it saves is the reader's wait: a block decoded here is a cache
hit later, and blocks taken together go to the engine as one batch.

Low priority: the worker starts a batch only when no reader's decode is running (a reader's decode is
never queued behind prefetching; one already running here is not interrupted, so a batch is bounded
to DEFAULT_BATCH blocks). A reader that needs a block this worker is decoding waits for it (single
flight) rather than decoding it again.

Bounded: at most DEFAULT_QUEUE keys wait; more are dropped and counted (prefetching is advice). Keys
cached or in flight when a batch is taken are skipped.

Threading: the queue has its own lock, never held while calling into the DecodeCache (whose lock is
never held while calling in here), so the two cannot deadlock. The worker thread starts on the first
submit and is a daemon; close() stops it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

# 16 blocks: a 64 KiB block is already ~16 engine segments of 1024 tokens, so 16 blocks give the engine
# a batch of ~256 segments, more than its step batch uses; larger batches only lengthen the wait of a
# reader that needs one of their blocks (it waits for the whole batch). Not measured against the engine.
DEFAULT_BATCH = 16

# 256 keys = 16 MiB of 64 KiB blocks: a quarter of the default RAM budget, the size of 2Q's probation
# queue that prefetched blocks enter; more would be evicted before they are read.
DEFAULT_QUEUE = 256


class Prefetcher:
    def __init__(self, cache, prefetch_batch: int = DEFAULT_BATCH, prefetch_queue: int = DEFAULT_QUEUE):
        self._cache = cache
        self.batch = prefetch_batch
        self.limit = prefetch_queue
        self._cond = threading.Condition()
        self._queue: deque[tuple[bytes, Callable]] = deque()
        self._queued: set[bytes] = set()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.dropped = self.errors = self.batches = 0

    def submit(self, keys: list[bytes], decode: Callable) -> None:
        with self._cond:
            if self._closed:
                return
            for key in keys:
                if key in self._queued:
                    continue
                if len(self._queue) >= self.limit:
                    self.dropped += 1
                    continue
                self._queue.append((key, decode))
                self._queued.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="llmfs-prefetch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {
                "decode_queue": len(self._queue),
                "prefetch_batches": self.batches,
                "prefetch_dropped": self.dropped,
                "prefetch_errors": self.errors,
            }

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._queued.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                self._busy = True
            try:
                self._cache._wait_foreground_idle()  # readers first
                keys, decode = self._take()
                keys = self._cache._claim(keys) if keys else []
                if keys:
                    try:
                        self._cache._run(keys, decode, prefetch=True)
                    except Exception as e:
                        # The readers of these blocks get the error (and log it) when they read them.
                        log.debug("prefetch of %d blocks failed: %s", len(keys), e)
                        with self._cond:
                            self.errors += len(keys)
                    with self._cond:
                        self.batches += 1
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _take(self) -> tuple[list[bytes], Callable | None]:
        """Up to `batch` queued keys that share the first one's decode callable, oldest first."""
        with self._cond:
            if not self._queue:
                return [], None
            decode = self._queue[0][1]
            keys, rest = [], deque()
            while self._queue:
                key, d = self._queue.popleft()
                if len(keys) < self.batch and (d is decode or d == decode):
                    keys.append(key)
                    self._queued.discard(key)
                else:
                    rest.append((key, d))
            self._queue = rest
            return keys, decode
