"""A byte-budgeted LRU of decoded blocks (host RAM).

This is the simple cache the filesystem starts with; the tiered, scan-resistant cache with a GPU
tier replaces its policy later behind the same get/put interface.

Threading: one lock around an OrderedDict; get/put are O(1) and never decode anything.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

# 64 MiB: a few hundred blocks, enough for sequential reads to reuse a block that several
# kernel read requests (128 KiB each) fall into, small next to the LM's working memory.
DEFAULT_BUDGET = 64 << 20


class BlockCache:
    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            data = self._entries.get(key)
            if data is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: bytes, data: bytes) -> None:
        if len(data) > self.budget:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._entries[key] = data
            self._bytes += len(data)
            while self._bytes > self.budget:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= len(victim)
                self.evictions += 1

    @property
    def size(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
