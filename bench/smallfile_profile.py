"""CPU time per FUSE request of the small-file workload, in-process (no kernel, no libfuse): the
calls libfuse's high-level API makes for a 1 KiB create+write+close and open+read+close, on
llmfs's FUSE edge (llmfs.fuseops.Operations over a store with the group commit and a decode
cache, as mounted) and on the binding's floor (llmfs/memfs.py), in the same process.

    .venv/bin/python bench/smallfile_profile.py [FILES] [ROUNDS]

Per request: LOOKUP (a getattr that fails), CREATE (create, then libfuse's getattr by handle),
GETXATTR security.capability (the kernel asks before the write), WRITE, FLUSH (close) and
RELEASE; then OPEN, READ, FLUSH, RELEASE. Times are the calling thread's CPU time
(time.thread_time), so other jobs on a shared machine inflate them less than wall time; the median
of the rounds is printed. What this leaves out is the same for both filesystems: the kernel's round
trips, libfuse and mfusepy's marshalling (`llmfs bench fs` measures the whole).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmfs.cache import DecodeCache, Readahead  # noqa: E402
from llmfs.codec import Registry  # noqa: E402
from mfusepy import FuseOSError  # noqa: E402

from llmfs import heap  # noqa: E402
from llmfs import namespace as ns  # noqa: E402
from llmfs.fuseops import Operations  # noqa: E402
from llmfs.memfs import MemFS  # noqa: E402
from llmfs.store import GROUP_BYTES, Store  # noqa: E402
from llmfs.writeback import DIRTY_LIMIT  # noqa: E402

PAYLOAD = (b"small file contents\n" * 52)[:1024]
WRITE = ("lookup", "create", "getattr(fh)", "getxattr", "write", "flush", "release")
READ = ("open", "read", "flush ", "release ")


def one_round(ops, base: str, n: int) -> dict[str, float]:
    """Microseconds of CPU per call of each request, over n files in directory base."""
    t = dict.fromkeys(WRITE + READ, 0.0)
    clock = time.thread_time
    for i in range(n):
        p = f"{base}/f{i:05d}"
        a = clock()
        try:
            ops.getattr(p, None)
        except FuseOSError:
            pass
        b = clock()
        fh = ops.create(p, 0o100644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        c = clock()
        ops.getattr(p, fh)
        d = clock()
        try:
            ops.getxattr(p, "security.capability")
        except FuseOSError:
            pass
        e = clock()
        ops.write(p, PAYLOAD, 0, fh)
        f = clock()
        ops.flush(p, fh)
        g = clock()
        ops.release(p, fh)
        h = clock()
        for k, dt in zip(WRITE, (b - a, c - b, d - c, e - d, f - e, g - f, h - g)):
            t[k] += dt
    for i in range(n):
        p = f"{base}/f{i:05d}"
        a = clock()
        fh = ops.open(p, os.O_RDONLY)
        b = clock()
        ops.read(p, 4096, 0, fh)
        c = clock()
        ops.flush(p, fh)
        d = clock()
        ops.release(p, fh)
        e = clock()
        for k, dt in zip(READ, (b - a, c - b, d - c, e - d)):
            t[k] += dt
    return {k: v / n * 1e6 for k, v in t.items()}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    heap.keep_freed_memory(DIRTY_LIMIT + GROUP_BYTES)  # as the daemon does (llmfs/mount.py)
    with tempfile.TemporaryDirectory(prefix="llmfs-sfprof-") as tmp:
        Store.create(tmp + "/s", 65536)
        store = Store(tmp + "/s")
        store.start_group_commit()
        # As mounted: released small files are stored in batches (namespace.release). Their
        # clock is stopped so that every batch is stored by the release that fills it, on this
        # thread, where its CPU is counted (spread over the releases of the batch).
        ns.RELEASE_WAIT = 3600.0
        fs = ns.Filesystem(
            store, Registry(), DecodeCache(64 << 20), readahead=Readahead(), batch_releases=True
        )
        llmfs = Operations(fs)
        mem = MemFS()
        for ops in (llmfs, mem):
            ops.mkdir("/d", 0o755)
        results = []
        for r in range(rounds):
            for ops in (llmfs, mem):
                ops.mkdir(f"/d/r{r}", 0o755)
            results.append((one_round(llmfs, f"/d/r{r}", n), one_round(mem, f"/d/r{r}", n)))
        fs.stop_batches()
        fs.flush_all()
        store.close()
    print(f"CPU µs per request, median of {rounds} rounds of {n} files of 1 KiB")
    print(f"{'':20} {'llmfs':>8} {'memfs':>8}")
    for k in WRITE + READ:
        a = statistics.median(r[0][k] for r in results)
        b = statistics.median(r[1][k] for r in results)
        print(f"{k:20} {a:8.1f} {b:8.1f}")
    for name, keys in (("create+write+close", WRITE), ("open+read+close", READ)):
        a = statistics.median(sum(r[0][k] for k in keys) for r in results)
        b = statistics.median(sum(r[1][k] for k in keys) for r in results)
        print(f"{name:20} {a:8.1f} {b:8.1f}")


if __name__ == "__main__":
    main()
