"""Readahead — decides which blocks of a file to prefetch, from the reads the file has seen.

Like the kernel's readahead: a read that continues where the last one stopped (or re-reads its last
block: several small reads inside one block) is sequential and doubles the window, up to a maximum; a
read anywhere else is random and stops prefetching for that file until it reads sequentially again.
Each block is named once: the window extends past what was already named instead of repeating it.
The filesystem turns the block indices into hashes and calls DecodeCache.prefetch() with them.

Bounded: the state of at most MAX_FILES files, least recently read forgotten first.
Threading: one lock; access() is O(window).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

# 2 blocks = 128 KiB, the kernel's default readahead; 16 blocks = 1 MiB: an LM block decodes in
# seconds, so 16 blocks ahead is already a long queue of decoding for a reader that stops early.
INITIAL_WINDOW = 2
MAX_WINDOW = 16
MAX_FILES = 1024


@dataclass
class _Stream:
    last: int           # last block index read
    window: int         # 0: random access, no prefetch
    named_until: int    # blocks below this were already named for prefetch


class Readahead:
    def __init__(self, initial: int = INITIAL_WINDOW, maximum: int = MAX_WINDOW,
                 max_files: int = MAX_FILES):
        self.initial = initial
        self.maximum = maximum
        self.max_files = max_files
        self._streams: OrderedDict[object, _Stream] = OrderedDict()
        self._lock = threading.Lock()

    def access(self, file_id, first: int, last: int | None = None, nblocks: int | None = None) -> list[int]:
        """A read of blocks [first, last] of file_id (nblocks in the file, if known) → blocks to prefetch."""
        last = first if last is None else last
        with self._lock:
            s = self._streams.get(file_id)
            if s is None:
                # A file read from its start is the common sequential case (cat, cp, tar).
                s = _Stream(last=-1, window=0, named_until=0)
                self._streams[file_id] = s
                while len(self._streams) > self.max_files:
                    self._streams.popitem(last=False)
            else:
                self._streams.move_to_end(file_id)
            if first in (s.last, s.last + 1):
                if first == s.last + 1 or s.window == 0:
                    s.window = min(max(s.window * 2, self.initial), self.maximum)
            else:
                s.window = 0
            s.last = last
            if s.window == 0:
                s.named_until = last + 1
                return []
            start = max(last + 1, s.named_until)
            end = last + 1 + s.window
            if nblocks is not None:
                end = min(end, nblocks)
            s.named_until = max(s.named_until, end)
            return list(range(start, end))

    def forget(self, file_id) -> None:
        """The file was closed (or truncated): drop its state."""
        with self._lock:
            self._streams.pop(file_id, None)
