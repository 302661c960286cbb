"""cache — decoded blocks kept in memory so a hot block is not decoded twice.

Keyed by the block's content hash: blocks are immutable and dedup'd, so an entry never needs
invalidation and two files sharing a block share its entry.

- DecodeCache (decode_cache.py): RAM + device tiers, 2Q policy (policy.py), single-flight batched
  get_many, background prefetch (prefetch.py), metrics.
- Readahead (readahead.py): which blocks a sequential reader will want next.
"""

from .decode_cache import DecodeCache
from .readahead import Readahead

__all__ = ["DecodeCache", "Readahead"]
