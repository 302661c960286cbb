"""cache — decoded blocks kept in memory so a hot block is not decoded twice.

Keyed by the block's content hash: blocks are immutable and dedup'd, so an entry never needs
invalidation and two files sharing a block share its entry.
"""
from .lru import BlockCache

__all__ = ["BlockCache"]
