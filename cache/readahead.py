"""Readahead — decides which blocks of a file, and which files of a directory, to prefetch, from
the reads and opens seen so far.

Like the kernel's readahead: a read that continues where the last one stopped (or re-reads its last
block: several small reads inside one block) is sequential and doubles the window, up to a maximum; a
read anywhere else is random and stops prefetching for that file until it reads sequentially again.
Each block is named once: the window extends past what was already named instead of repeating it.
The filesystem turns the block indices into hashes and calls DecodeCache.prefetch() with them.

Directories: a reader that opens a directory's files in name order (cp -r, tar, grep -r, rsync
all walk readdir's order, which is name order here) will open the next ones too. Each small
LM-coded file alone would decode as a batch of one or two segments, far below the rows the engine
steps together for the same cost per step; naming the next files' blocks with this one's fills the
batch. Opening the directory's next regular file after the one opened last starts or continues a
walk (subdirectories in between are skipped, as cp -r leaves them for its recursion); the next
files are named when the walk has reached the middle of what was named before (so the next batch
decodes while the reader works through the first); any other open ends the walk.

Bounded: the state of at most MAX_FILES files and MAX_FILES directories, least recently used
forgotten first.
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
class _Walk:
    last: bytes  # name of the file opened last
    named_until: bytes  # files up to this name were named for prefetch ...
    refill_at: bytes  # ... and the next ones are named when the walk reaches this name


@dataclass
class _Stream:
    last: int  # last block index read
    window: int  # 0: random access, no prefetch
    named_until: int  # blocks below this were already named for prefetch


class Readahead:
    def __init__(self, initial: int = INITIAL_WINDOW, maximum: int = MAX_WINDOW, max_files: int = MAX_FILES):
        self.initial = initial
        self.maximum = maximum
        self.max_files = max_files
        self._streams: OrderedDict[object, _Stream] = OrderedDict()
        self._walks: OrderedDict[object, _Walk] = OrderedDict()
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

    def open_in_dir(self, dir_id, name: bytes, next_file) -> bytes | None:
        """File `name` of directory dir_id is opened → None, or the name after which the caller
        should list the directory's next files and name them with named_files().
        next_file(name) gives the name of the directory's next regular file after `name` (None at
        the end): opening exactly that file continues a walk."""
        with self._lock:
            w = self._walks.get(dir_id)
            if w is None:
                self._walks[dir_id] = _Walk(last=name, named_until=name, refill_at=name)
                while len(self._walks) > self.max_files:
                    self._walks.popitem(last=False)
                return None
            self._walks.move_to_end(dir_id)
            walking = name > w.last and next_file(w.last) == name
            w.last = name
            if not walking:
                w.named_until = w.refill_at = name
                return None
            if name < w.refill_at:
                return None
            return max(name, w.named_until)

    def named_files(self, dir_id, names: list[bytes]) -> None:
        """The caller named these files (in order) after open_in_dir's answer."""
        with self._lock:
            w = self._walks.get(dir_id)
            if w is None or not names:
                if w is not None:  # the end of the directory: nothing more to name
                    w.refill_at = b"\xff" * 256
                return
            w.named_until = names[-1]
            w.refill_at = names[len(names) // 2]
