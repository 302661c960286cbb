"""The daemon's heap: glibc malloc told to keep the memory that the write and read paths reuse.

A sequential write moves every byte through fresh heap memory several times: the request libfuse
hands over (mfusepy copies it into a bytes object), the dirty block it lands in, the container,
LMDB's pages of a write transaction (malloc'd per value, freed at the group commit). With glibc's
defaults that memory goes back to the kernel as soon as it is freed — the dynamic mmap threshold
maps and unmaps the 1 MiB requests, the heap top above M_TRIM_THRESHOLD is trimmed, and each FUSE
worker thread allocates from an arena of its own whose heaps are shrunk with MADV_DONTNEED and
deleted when empty — so the next MiB faults every page in again: the kernel zeroes it, charges it
to the cgroup and maps it. Profiles of `llmfs bench fs` writes through a mount spent about 40 % of
the daemon's CPU in those page faults.

So the daemon (and only the daemon: it is a process-wide setting) asks malloc for
  * one arena (M_ARENA_MAX 1): the FUSE threads run Python under one GIL anyway, and one arena's
    free lists are reused by whichever thread allocates next;
  * no trimming below `retain` bytes (M_TRIM_THRESHOLD): what a burst of writes used — the dirty
    limit plus a group commit's worth of containers — stays mapped for the next burst;
  * mmap only for allocations above MMAP_THRESHOLD (M_MMAP_THRESHOLD): requests and blocks come
    from the heap; model weights and other large buffers are still mapped and unmapped alone.
The cost: the daemon's resident memory stays near its peak of buffered writes (at most `retain`
more than what is in use) instead of shrinking after each burst.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("llmfs")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# glibc's own upper bound for its dynamic mmap threshold on 64-bit systems.
MMAP_THRESHOLD = 32 << 20


def keep_freed_memory(retain: int) -> bool:
    """Tune glibc's malloc as the module docstring says; call before the worker threads start.
    Returns False (and changes nothing) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    retain = min(max(retain, MMAP_THRESHOLD), (1 << 31) - 1)
    done = all(
        mallopt(param, value)
        for param, value in ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, retain))
    )
    if not done:
        log.warning("malloc did not take the daemon's heap settings; writes may run slower")
    return done
