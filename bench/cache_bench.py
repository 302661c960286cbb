"""Measure the decode cache: hit rates of 2Q (DecodeCache) vs a plain LRU on block traces,
per-entry memory overhead, and the cost of a device-tier hit. Light: a few seconds on one core.

    .venv/bin/python bench/cache_bench.py [policy] [overhead] [device]

Traces use 64 KiB blocks and a 64 MiB budget (1024 blocks), read as the filesystem reads: get(), and on
a miss put() (the decode itself is not run: every miss is one decode saved or not).
"""

from __future__ import annotations

import os
import random
import sys
import time
import tracemalloc
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmfs.cache import DecodeCache, policy  # noqa: E402

BLOCK = 64 << 10
BUDGET = 64 << 20
DATA = bytes(BLOCK)  # one shared plaintext: the caches only look at its length


class LRU:
    """The baseline: a plain byte-budgeted LRU with the DecodeCache's get/put (what llmfs began with)."""

    def __init__(self, budget: int):
        self.budget, self.bytes = budget, 0
        self.entries: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, key: bytes) -> bytes | None:
        data = self.entries.get(key)
        if data is not None:
            self.entries.move_to_end(key)
        return data

    def put(self, key: bytes, data: bytes) -> None:
        old = self.entries.pop(key, None)
        self.bytes += len(data) - (len(old) if old is not None else 0)
        self.entries[key] = data
        while self.bytes > self.budget:
            self.bytes -= len(self.entries.popitem(last=False)[1])


def key(name: str, i: int) -> bytes:
    return f"{name}{i}".encode().ljust(32, b"\0")


def hot_and_scan(seed=1, hot=512, scan=16384, every=4, rereads=1, warm=5000, after=5000, shuffle=0):
    """A hot set of `hot` blocks read at random; then a scan (a `tar` of the mount) of `scan` distinct
    blocks, each read `rereads` times in a row (or, with shuffle, in an order shuffled within windows of
    `shuffle` reads, as FUSE requests answered out of order), with one hot read per `every` scan blocks
    (every=0: none); then hot reads. Yields (key, is_hot)."""
    rng = random.Random(seed)
    for _ in range(warm):
        yield key("h", rng.randrange(hot)), True
    scan_reads = [i for i in range(scan) for _ in range(rereads)]
    for w in range(0, len(scan_reads), shuffle or 1):
        part = scan_reads[w : w + (shuffle or 1)]
        rng.shuffle(part)
        scan_reads[w : w + len(part)] = part
    for n, i in enumerate(scan_reads):
        yield key("s", i), False
        if every and n % (every * rereads) == 0:
            yield key("h", rng.randrange(hot)), True
    for _ in range(after):
        yield key("h", rng.randrange(hot)), True


def zipf(seed=2, blocks=8192, reads=50000, s=0.9):
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** s for i in range(blocks)]
    for i in rng.choices(range(blocks), weights, k=reads):
        yield key("z", i), True


def loop(blocks=1536, rounds=20):
    for _ in range(rounds):
        for i in range(blocks):
            yield key("l", i), True


def replay(cache, trace, skip_warm: int = 0):
    """Hit rate of all reads, and of the hot reads after the first skip_warm reads."""
    hits = n = hot_hits = hot_n = 0
    for i, (k, is_hot) in enumerate(trace):
        hit = cache.get(k) is not None
        if not hit:
            cache.put(k, DATA)
        hits += hit
        n += 1
        if is_hot and i >= skip_warm:
            hot_hits += hit
            hot_n += 1
    return hits / n, hot_hits / max(hot_n, 1)


def bench_policy() -> None:
    cases = [
        ("hot 32 MiB + 1 GiB scan, 1 read/block", lambda: hot_and_scan(), 5000),
        ("hot 32 MiB + 1 GiB scan, 4 reads/block", lambda: hot_and_scan(rereads=4), 5000),
        ("  same, reads shuffled within 48", lambda: hot_and_scan(rereads=4, shuffle=48), 5000),
        ("hot 32 MiB, then a 1 GiB scan alone", lambda: hot_and_scan(every=0), 5000),
        ("Zipf(0.9) over 512 MiB, no scan", lambda: zipf(), 0),
        ("loop over 96 MiB", lambda: loop(), 0),
    ]
    print(
        f"{'trace':42} {'LRU all':>8} {'LRU hot':>8} {'2Q all':>8} {'2Q hot':>8} {'2Q+dev hot':>10} "
        f"{'classic 2Q hot':>14}"
    )
    for name, trace, warm in cases:
        lru = replay(LRU(BUDGET), trace(), warm)
        twoq = replay(DecodeCache(BUDGET, 0, device=None), trace(), warm)
        # Same capacity split in two tiers: half RAM, half (CPU-tensor) device.
        tiered = replay(DecodeCache(BUDGET // 2, BUDGET // 2, device="cpu"), trace(), warm)
        window, policy.CORRELATION_WINDOW = policy.CORRELATION_WINDOW, 1 << 62  # never promote in A1in
        try:
            classic = replay(DecodeCache(BUDGET, 0, device=None), trace(), warm)
        finally:
            policy.CORRELATION_WINDOW = window
        print(
            f"{name:42} {lru[0]:8.3f} {lru[1]:8.3f} {twoq[0]:8.3f} {twoq[1]:8.3f} {tiered[1]:10.3f} "
            f"{classic[1]:14.3f}"
        )
    print("'hot' = hit rate of the hot reads after the warm-up (during and after the scan)")


def bench_overhead(n: int = 20000) -> None:
    """Host bytes per entry beyond the plaintext, with tiny (1-byte) plaintexts, all RAM."""
    keys = [os.urandom(32) for _ in range(n)]
    datas = [bytes([i % 256]) + b"" for i in range(n)]
    c = DecodeCache(1 << 40, 0, device=None)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for k, d in zip(keys, datas):
        c.put(k, d)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    # The 1-byte bytes objects are interned singletons (not counted above): add a bytes header each.
    header = sys.getsizeof(b"")
    print(
        f"RAM entry: {used / n:.0f} bytes of bookkeeping + {header} of bytes header = "
        f"{used / n + header:.0f} bytes per entry beyond the plaintext"
    )
    # Device entries: torch allocates outside tracemalloc's view, so count RSS growth of 1-byte CPU
    # tensors (noisy: the allocator reuses freed memory; the first run in a process reads highest).
    c = DecodeCache(1 << 20, 1 << 40, device="cpu")
    before = rss()
    with c._lock:  # straight into the device tier, as demotion does
        for k in keys:
            c._device.put(k, b"x")
    print(
        f"device entry: ~{(rss() - before) / n:.0f} host bytes per entry (RSS growth; tensor objects, "
        f"torch storage, dict slot)"
    )


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_device(rounds: int = 2000) -> None:
    c = DecodeCache(BLOCK + 4096, 64 * BLOCK, device="cpu")
    a, b = key("a", 0), key("b", 0)
    for k in (a, b):  # admit twice each (second time via the ghost list) so both are protected
        c.put(k, DATA)
        c.put(key("x", 0), DATA)
        c.put(key("y", 0), DATA)
    for k in (a, b):
        if c.get(k) is None:
            c.put(k, DATA)
    start = time.perf_counter()
    for _ in range(rounds):  # RAM holds one block: each get swaps a and b between the tiers
        c.get(a)
        c.get(b)
    dt = (time.perf_counter() - start) / (2 * rounds)
    m = c.metrics()
    print(
        f"device hit with promotion+demotion (64 KiB, CPU tensors): {dt * 1e6:.0f} us; "
        f"promotions {m['promotions']}, demotions {m['demotions']}"
    )


if __name__ == "__main__":
    which = sys.argv[1:] or ["policy", "overhead", "device"]
    for w in which:
        {"policy": bench_policy, "overhead": bench_overhead, "device": bench_device}[w]()
