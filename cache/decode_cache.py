"""DecodeCache — decoded blocks by content hash, in two tiers, with single-flight batched decoding.

Decoding an LM-compressed block costs seconds on a CPU, so the cache saves
- repeated decodes of a hot block: 2Q (cache/policy.py) keeps the hot set through a `tar` of the mount;
- duplicate decodes: a block being decoded for one reader (or for the prefetcher) is awaited by the
  others, never decoded twice (single flight);
- per-call overhead: all misses of one get_many go to the engine in one `decode(keys)` call;
- waiting: prefetch() decodes blocks that are about to be read in a background thread
  (cache/prefetch.py), which gives way to readers' decodes.

Tiers (cache/tiers.py): host RAM is the tier blocks enter and are served from; a torch device (CUDA when
there is one; CPU tensors in tests) is the second tier, holding protected blocks evicted from RAM.
RAM first, because a reader needs the plaintext as host bytes for FUSE: a RAM hit returns the stored
bytes object with no copy, while a device hit costs one device→host copy (µs for 64 KiB; see
bench/cache_bench.py) — slower than RAM, still ~10^5 times cheaper than decoding. So blocks are demoted
RAM → device when RAM evicts them, and promoted device → RAM on a hit; a block lives in one tier at a
time, so the capacity is the sum of the budgets.

Memory: each tier has a byte budget that counts what its entries cost (plaintext + per-entry overhead:
RAM_ENTRY_OVERHEAD = 256 bytes; device entries rounded up to 512 bytes); a tier never
exceeds its budget between calls. Outside the budgets: ghost keys (~170 bytes each with the 32-byte key;
at most GHOST_FRACTION of the capacity's worth of blocks: 65,536 keys = ~11 MiB for 8 GiB of 64 KiB
blocks), DEVICE_HOST_OVERHEAD (~500) bytes of host memory per device entry (~0.8 % of the device
tier's size at 64 KiB blocks), blocks being decoded, and the prefetch queue (bounded).

Threading: one lock guards the policy, both tiers, the table of decodes in flight and the counters; it
is held for bookkeeping and the copies between tiers (µs–ms), never during a decode. Any thread may call
any method. decode() callables run in the calling thread (get_many) or the prefetch worker, without the
lock, and may run concurrently for different keys.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from .policy import DEVICE, RAM, TwoQueue
from .prefetch import Prefetcher
from .tiers import DeviceTier, RamTier, device_charge, ram_charge

Decode = Callable[[list[bytes]], list[bytes]]

# 64 MiB, as the simple LRU had: a few hundred 64 KiB blocks, small next to the LM's working memory.
DEFAULT_RAM_BUDGET = 64 << 20


class _Flight:
    """One key being decoded: the decoding thread fills it, other readers wait on it."""

    __slots__ = ("done", "data", "error")

    def __init__(self):
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def wait(self) -> bytes:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.data


class DecodeCache:
    def __init__(
        self, ram_budget: int = DEFAULT_RAM_BUDGET, device_budget: int = 0, device=None, **prefetch_options
    ):
        """device None: CUDA when available, else no device tier (CPU tensors would only be RAM with
        more overhead); pass device="cpu" to run the device tier on CPU tensors (tests). torch is
        imported only when there is a device tier. prefetch_options: prefetch_batch, prefetch_queue."""
        if device is None and device_budget > 0:
            import torch

            device = "cuda" if torch.cuda.is_available() else None
        if device is None:
            device_budget = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when no reader is decoding
        self._policy = TwoQueue(ram_budget, device_budget, ram_charge, device_charge)
        self._ram = RamTier()
        self._device = DeviceTier(device)
        self._flights: dict[bytes, _Flight] = {}
        self._foreground = 0  # readers' decodes running now; the prefetcher waits for 0
        self._closed = False
        self._counts = dict.fromkeys(
            (
                "hits",
                "misses",
                "ram_hits",
                "device_hits",
                "ram_evictions",
                "demotions",
                "promotions",
                "device_evictions",
                "decodes",
                "decoded_blocks",
                "decode_errors",
                "prefetched",
                "single_flight_waits",
            ),
            0,
        )
        self._decode_seconds = 0.0
        self._prefetcher = Prefetcher(self, **prefetch_options)

    # ------------------------------------------------------------------ the simple interface
    @property
    def ram_budget(self) -> int:
        return self._policy.ram_budget

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            data = self._lookup(key)
            self._counts["hits" if data is not None else "misses"] += 1
            return data

    def put(self, key: bytes, data: bytes) -> None:
        with self._lock:
            self._admit(key, bytes(data))

    # ------------------------------------------------------------------ batched, single-flight
    def get_many(self, keys: list[bytes], decode: Decode) -> list[bytes]:
        """Plaintexts of keys, in order. Misses not in flight are decoded by one decode(missing) call in
        this thread; misses in flight elsewhere are awaited. A decode error is raised here and in every
        thread waiting for one of its keys; nothing is cached for them."""
        found: dict[bytes, bytes] = {}
        mine: list[bytes] = []
        waits: dict[bytes, _Flight] = {}
        with self._lock:
            for key in dict.fromkeys(keys):  # each key once, in order
                data = self._lookup(key)
                if data is not None:
                    self._counts["hits"] += 1
                    found[key] = data
                    continue
                self._counts["misses"] += 1
                flight = self._flights.get(key)
                if flight is not None:
                    self._counts["single_flight_waits"] += 1
                    waits[key] = flight
                else:
                    self._flights[key] = _Flight()
                    mine.append(key)
            if mine:
                self._foreground += 1
        if mine:
            try:
                found.update(self._run(mine, decode))
            finally:
                with self._lock:
                    self._foreground -= 1
                    if not self._foreground:
                        self._idle.notify_all()
        for key, flight in waits.items():
            found[key] = flight.wait()
        return [found[key] for key in keys]

    def prefetch(self, keys: Iterable[bytes], decode: Decode) -> None:
        """Decode keys in the background (low priority): for a hot file's remaining blocks, or the
        blocks Readahead names. Keys cached or in flight are skipped; beyond the queue's bound, dropped."""
        with self._lock:
            if self._closed:
                return
            keys = [k for k in dict.fromkeys(keys) if self._policy.tier(k) is None and k not in self._flights]
        if keys:
            self._prefetcher.submit(keys, decode)

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Block until the prefetch queue is empty and its worker idle; False on timeout."""
        return self._prefetcher.wait_idle(timeout)

    # ------------------------------------------------------------------ memory
    def resize(self, ram_budget: int | None = None, device_budget: int | None = None) -> None:
        """Change budgets; on a shrink the evicted entries are released before this returns."""
        with self._lock:
            ram = self._policy.ram_budget if ram_budget is None else ram_budget
            dev = self._policy.device_budget if device_budget is None else device_budget
            self._apply(self._policy.resize(ram, dev))
            self._device.release()

    def clear(self) -> None:
        """Drop every entry and ghost; the budgets stay."""
        with self._lock:
            ram, dev = self._policy.ram_budget, self._policy.device_budget
            self._apply(self._policy.resize(0, 0))
            self._policy.set_budgets(ram, dev)
            self._device.release()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the prefetch worker (a decode it is running finishes first, up to timeout)."""
        with self._lock:
            self._closed = True
            self._idle.notify_all()
        self._prefetcher.close(timeout)

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict:
        """A flat snapshot of the counters (since creation) and the current sizes:
        hits/misses: keys asked for by get/get_many (a key awaited in flight is a miss and a
          single_flight_wait); ram_hits/device_hits split the hits by tier;
        ram_/device_ budget, bytes (charged), entries; ram_evictions (dropped from RAM), demotions
          (RAM → device), promotions (device → RAM), device_evictions (dropped from the device);
        probation/protected/ghost_entries: the 2Q queues; in_flight: keys being decoded now;
        decodes (calls of decode), decoded_blocks, decode_errors (calls that raised), decode_seconds
          (wall time inside decode, summed over threads), prefetched (blocks decoded by the
          prefetcher), decode_queue (keys waiting for it), prefetch_batches/_dropped/_errors."""
        with self._lock:
            p = self._policy
            m = dict(self._counts)
            m.update(
                decode_seconds=round(self._decode_seconds, 6),
                in_flight=len(self._flights),
                ram_budget=p.ram_budget,
                ram_bytes=self._ram.bytes,
                ram_entries=len(self._ram),
                device=str(self._device.device) if self._device.device is not None else None,
                device_budget=p.device_budget,
                device_bytes=self._device.bytes,
                device_entries=len(self._device),
                probation_entries=len(p.probation),
                protected_entries=len(p.protected),
                ghost_entries=len(p.ghosts),
            )
        m.update(self._prefetcher.stats())  # its own lock, never taken inside ours
        return m

    @property
    def size(self) -> int:
        """Charged bytes in RAM."""
        return self._ram.bytes

    def __len__(self) -> int:
        return len(self._ram) + len(self._device)

    # ------------------------------------------------------------------ for the prefetcher
    def _claim(self, keys: list[bytes]) -> list[bytes]:
        """Start flights for the keys neither cached nor in flight; the caller must _run() them."""
        with self._lock:
            claimed = [k for k in keys if self._policy.tier(k) is None and k not in self._flights]
            for k in claimed:
                self._flights[k] = _Flight()
            return claimed

    def _wait_foreground_idle(self) -> None:
        with self._lock:
            while self._foreground and not self._closed:
                self._idle.wait()

    # ------------------------------------------------------------------ internals (lock held unless said)
    def _run(self, keys: list[bytes], decode: Decode, prefetch: bool = False) -> dict[bytes, bytes]:
        """Decode keys whose flights this thread owns (lock NOT held); resolve the flights."""
        start = time.perf_counter()
        try:
            out = list(decode(list(keys)))
            if len(out) != len(keys):
                raise ValueError(f"decode returned {len(out)} blocks for {len(keys)} keys")
            out = [d if type(d) is bytes else bytes(d) for d in out]
        except BaseException as e:
            with self._lock:
                self._count_decode(start, 0)
                self._counts["decode_errors"] += 1
                for k in keys:
                    flight = self._flights.pop(k)
                    flight.error = e
                    flight.done.set()
            raise
        with self._lock:
            self._count_decode(start, len(keys))
            if prefetch:
                self._counts["prefetched"] += len(keys)
            for k, data in zip(keys, out):
                self._admit(k, data)
                flight = self._flights.pop(k)
                flight.data = data
                flight.done.set()
        return dict(zip(keys, out))

    def _count_decode(self, start: float, blocks: int) -> None:
        self._counts["decodes"] += 1
        self._counts["decoded_blocks"] += blocks
        self._decode_seconds += time.perf_counter() - start

    def _lookup(self, key: bytes) -> bytes | None:
        tier = self._policy.tier(key)
        if tier is None:
            return None
        moves = self._policy.hit(key)
        self._apply(moves)
        if tier == RAM:
            self._counts["ram_hits"] += 1
            return self._ram.get(key)
        self._counts["device_hits"] += 1
        if key in self._ram:  # promoted by the moves
            return self._ram.get(key)
        return self._device.read(key)  # too big for RAM as it is now: served from the device

    def _admit(self, key: bytes, data: bytes) -> None:
        self._apply(self._policy.admit(key, len(data)), data)

    def _apply(self, moves, arriving: bytes | None = None) -> None:
        for key, src, dst in moves:
            if src is None:
                self._ram.put(key, arriving)
            elif src == RAM and dst == DEVICE:
                self._device.put(key, self._ram.pop(key))
                self._counts["demotions"] += 1
            elif src == DEVICE and dst == RAM:
                self._ram.put(key, self._device.take(key))
                self._counts["promotions"] += 1
            elif src == RAM:
                self._ram.pop(key)
                self._counts["ram_evictions"] += 1
            else:
                # Freed tensors go back to CUDA's caching allocator, which reuses them for the next
                # demotions (same block sizes); only resize() returns memory to the driver.
                self._device.drop(key)
                self._counts["device_evictions"] += 1
