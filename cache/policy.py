"""Policy — 2Q admission and eviction over the two tiers, as bookkeeping of keys and lengths.

Why 2Q (Johnson & Shasha, VLDB '94, the "full" version with A1in, A1out and Am), with one change:
- A scan must not flush the hot set: one `tar` of the mount reads every block once. In 2Q a block read
  for the first time enters a FIFO (probation, A1in, 25 % of RAM); it enters the protected LRU (Am) only
  when it is asked for again later: after it left probation, while its key is still remembered (ghosts,
  A1out), or, our change, while still in probation but more than CORRELATION_WINDOW admissions after it
  arrived. A scan's blocks pass through probation and the ghost list and never touch the protected set.
- Re-reads of one block in quick succession (several small reads inside one 64 KiB block, FUSE requests
  answered out of order) are one "correlated reference" and promote nothing, so a scan that reads each
  block four times is still a scan (SLRU, or 2Q promoting on any second hit, would let it in).
- bench/cache_bench.py replays block traces (docs/benchmarks.md, "Decode cache"): with a hot set
  and a scan, plain LRU loses most of the hot set and classic 2Q a fifth of it (a hot set read while
  the cache was filling sat in probation and was flushed by the scan); this 2Q keeps nearly all of
  it, also when each scan block is read several times, and does a little better than LRU without a
  scan. ARC would also resist the scan with adaptive sizes and more state; W-TinyLFU needs a
  frequency sketch. 2Q is the simplest that measured well here; not measured: ARC, W-TinyLFU.
- The price: a hot block read only at long intervals is protected on its second decode (it left
  probation, its ghost brought it back). For a block that costs seconds to decode, once.

Tiers: probation lives in RAM; the protected LRU spans both tiers, its most recent part in RAM and its
older part on the device ("demoted"). A protected block evicted from RAM is demoted to the device; a
device hit promotes it back to RAM. Blocks evicted from probation are dropped (a scan never reaches the
device) and their keys become ghosts. The ghost list remembers GHOST_FRACTION of both tiers' capacity,
so that a hot set larger than RAM but within RAM + device can still prove itself and be demoted.

The policy moves no data: every call returns the Moves that the DecodeCache applies to the tiers, in
order. Threading: none; callers hold the DecodeCache's lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

RAM = "ram"
DEVICE = "device"

# Johnson & Shasha's recommended sizes: A1in = 25 % of the cache, A1out = 50 % of it (as keys).
PROBATION_FRACTION = 0.25
GHOST_FRACTION = 0.5

# A hit on a probation block promotes it only if more than this many blocks were admitted after it:
# closer re-reads are one correlated reference (a scan's reads inside a block, FUSE requests answered
# out of order: libfuse's max_background 12 x 128 KiB = 24 blocks). Without it, a hot set read while
# the cache was filling sat unprotected in probation and a scan flushed it (bench/cache_bench.py).
CORRELATION_WINDOW = 32


class Move(NamedTuple):
    """Move key's data from src to dst; src None = it arrives now, dst None = it is dropped."""

    key: bytes
    src: str | None
    dst: str | None


class TwoQueue:
    def __init__(
        self,
        ram_budget: int,
        device_budget: int,
        ram_charge: Callable[[int], int],
        device_charge: Callable[[int], int],
        probation_fraction: float = PROBATION_FRACTION,
        ghost_fraction: float = GHOST_FRACTION,
    ):
        self.ram_charge = ram_charge
        self.device_charge = device_charge
        self.probation_fraction = probation_fraction
        self.ghost_fraction = ghost_fraction
        # key -> plaintext length; insertion order is FIFO (probation) or LRU (the others).
        # probation: key -> (length, admission number)
        self.probation: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self.admissions = 0
        self.protected: OrderedDict[bytes, int] = OrderedDict()
        self.demoted: OrderedDict[bytes, int] = OrderedDict()
        self.ghosts: OrderedDict[bytes, int] = OrderedDict()
        self.probation_bytes = self.protected_bytes = self.device_bytes = self.ghost_bytes = 0
        self.set_budgets(ram_budget, device_budget)

    def set_budgets(self, ram_budget: int, device_budget: int) -> None:
        self.ram_budget = ram_budget
        self.device_budget = device_budget
        self.probation_budget = int(ram_budget * self.probation_fraction)
        self.ghost_budget = int((ram_budget + device_budget) * self.ghost_fraction)

    @property
    def ram_bytes(self) -> int:
        return self.probation_bytes + self.protected_bytes

    def tier(self, key: bytes) -> str | None:
        if key in self.probation or key in self.protected:
            return RAM
        if key in self.demoted:
            return DEVICE
        return None

    # ------------------------------------------------------------------ events
    def hit(self, key: bytes) -> list[Move]:
        """key was asked for and is resident: update recency; a device hit comes back to RAM."""
        if key in self.protected:
            self.protected.move_to_end(key)
            return []
        if key in self.demoted:
            if self.ram_charge(self.demoted[key]) > self.ram_budget:  # RAM shrank below it: stay
                self.demoted.move_to_end(key)
                return []
            length = self.demoted.pop(key)
            self.device_bytes -= self.device_charge(length)
            self.protected[key] = length
            self.protected_bytes += self.ram_charge(length)
            return [Move(key, DEVICE, RAM)] + self._fit(key)
        entry = self.probation.get(key)
        if entry is not None and self.admissions - entry[1] > CORRELATION_WINDOW:
            # Read again well after it arrived: a hot block, not a scan re-reading what it just read.
            del self.probation[key]
            length = entry[0]
            self.probation_bytes -= self.ram_charge(length)
            self.protected[key] = length
            self.protected_bytes += self.ram_charge(length)
        return []  # same tier: nothing moves

    def admit(self, key: bytes, length: int) -> list[Move]:
        """A decoded block arrives; [] if it is already resident or can never fit in RAM."""
        charge = self.ram_charge(length)
        if self.tier(key) is not None or charge > self.ram_budget:
            return []
        if self.ghosts.pop(key, None) is not None:
            # Asked for again after leaving probation: a hot block, not a scan.
            self.ghost_bytes -= length
            self.protected[key] = length
            self.protected_bytes += charge
        else:
            self.probation[key] = (length, self.admissions)
            self.probation_bytes += charge
        self.admissions += 1
        return [Move(key, None, RAM)] + self._fit(key)

    def resize(self, ram_budget: int, device_budget: int) -> list[Move]:
        self.set_budgets(ram_budget, device_budget)
        moves = self._fit(None)
        while self.device_bytes > self.device_budget:
            moves.append(self._drop_demoted())
        self._trim_ghosts()
        return moves

    # ------------------------------------------------------------------ eviction
    def _fit(self, newest: bytes | None) -> list[Move]:
        """Evict from RAM until it is within budget, never the block just admitted or promoted."""
        moves = []
        while self.ram_bytes > self.ram_budget:
            oldest_probation = next(iter(self.probation), None)
            probation_first = self.probation_bytes > self.probation_budget or not self.protected
            if oldest_probation is not None and oldest_probation != newest and probation_first:
                moves.append(self._evict_probation())
            elif self.protected and next(iter(self.protected)) != newest:
                moves.extend(self._demote())
            else:
                moves.append(self._evict_probation())
        self._trim_ghosts()
        return moves

    def _evict_probation(self) -> Move:
        key, (length, _) = self.probation.popitem(last=False)
        self.probation_bytes -= self.ram_charge(length)
        self.ghosts[key] = length
        self.ghost_bytes += length
        return Move(key, RAM, None)

    def _demote(self) -> list[Move]:
        key, length = self.protected.popitem(last=False)
        self.protected_bytes -= self.ram_charge(length)
        charge = self.device_charge(length)
        if charge > self.device_budget:
            return [Move(key, RAM, None)]
        moves = []
        while self.device_bytes + charge > self.device_budget:
            moves.append(self._drop_demoted())
        self.demoted[key] = length
        self.device_bytes += charge
        moves.append(Move(key, RAM, DEVICE))
        return moves

    def _drop_demoted(self) -> Move:
        key, length = self.demoted.popitem(last=False)
        self.device_bytes -= self.device_charge(length)
        return Move(key, DEVICE, None)

    def _trim_ghosts(self) -> None:
        while self.ghost_bytes > self.ghost_budget and self.ghosts:
            _, length = self.ghosts.popitem(last=False)
            self.ghost_bytes -= length
