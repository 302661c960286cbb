"""Where a MiB goes on the sequential paths, in-process (no kernel): llmfs.fuseops.Operations on
a fresh store, set up as the mount daemon sets it up (group commit, decode cache, readahead),
driven with the requests the kernel sends for `llmfs bench fs` (measured with `llmfs --debug
mount`: writes of --write-request bytes, reads of --read-request bytes; both 1 MiB with the daemon's readahead).

Prints wall and process CPU seconds per MiB for: write (the requests, then fsync and close) and a
cold read on a fresh Filesystem (an empty decode cache, as after a remount), for incompressible
and text data; with --profile, the top functions of each phase by own time (cProfile).

With --mount, the same through a real mount instead (`llmfs mount` of a fresh store; writes of
1 MiB, fsync; page cache dropped before the read when root): the daemon's CPU milliseconds and page
faults per MiB, read from /proc — figures that survive a busy machine far better than MiB/s.

    python bench/seqio_profile.py --size 64M [--profile | --mount]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmfs.cache import DecodeCache, Readahead
from llmfs.codec import Registry

from llmfs import heap
from llmfs.bench import text_corpus
from llmfs.fuseops import Operations
from llmfs.namespace import DIRTY_LIMIT, Filesystem
from llmfs.store import GROUP_BYTES, Store
from llmfs.units import parse_size


def phase(label: str, mib: float, fn, profile: bool, *args):
    prof = cProfile.Profile() if profile else None
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0, t0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    result = fn(*args)
    if prof:
        prof.disable()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(
        f"{label:24} {mib / wall:8.1f} MiB/s wall  {1000 * cpu / mib:7.2f} ms CPU/MiB "
        f"({mib / cpu:7.1f} MiB per CPU-second), {faults / mib:5.0f} page faults/MiB"
    )
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    return result


def open_ops(path: str) -> Operations:
    """The daemon's set-up (llmfs/mount.py) on the store at path, without the kernel."""
    store = Store(path)
    store.start_group_commit()
    return Operations(Filesystem(store, Registry(), DecodeCache(), readahead=Readahead()))


def close_ops(ops: Operations) -> None:
    ops.fs.cache.close()
    ops.fs.store.close()


def write_file(ops: Operations, name: str, data: bytes, step: int) -> None:
    fh = ops.create("/" + name, 0o644, os.O_WRONLY)
    view = memoryview(data)
    for off in range(0, len(data), step):
        ops.write(None, bytes(view[off : off + step]), off, fh)
    ops.flush(None, fh)
    ops.fsync(None, 0, fh)
    ops.release(None, fh)


def read_file(ops: Operations, name: str, size: int, step: int) -> bytes:
    fh = ops.open("/" + name, os.O_RDONLY)
    out = [ops.read(None, step, off, fh) for off in range(0, size, step)]
    ops.release(None, fh)
    return b"".join(out)


def daemon_counters(pid: int) -> tuple[float, int]:
    """(CPU seconds, minor page faults) of process pid so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of process pid's live threads, summed by thread name (comm)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out[comm] = out.get(comm, 0.0) + cpu
    return out


def through_mount(size: int, block_size: int) -> None:
    llmfs = [sys.executable, "-m", "llmfs.cli"]
    mib = size / (1 << 20)
    with tempfile.TemporaryDirectory(prefix="seqio-") as tmp:
        store, mnt = os.path.join(tmp, "s"), os.path.join(tmp, "m")
        os.mkdir(mnt)
        subprocess.run(
            [*llmfs, "mkfs", store, "--block-size", str(block_size)], check=True, capture_output=True
        )
        subprocess.run([*llmfs, "mount", store, mnt, "--no-compaction"], check=True)
        try:
            lock = Path(store, "llmfs.lock").read_text().split()
            pid = int(lock[lock.index("pid") + 1])
            for name, data in (("random", os.urandom(size)), ("text", text_corpus(size))):
                path = os.path.join(mnt, name)
                c0, f0 = daemon_counters(pid)
                e0 = thread_cpu(pid).get("llmfs-encode", 0.0)
                t0 = time.perf_counter()
                with open(path, "wb") as f:
                    for off in range(0, size, 1 << 20):
                        f.write(data[off : off + (1 << 20)])
                    f.flush()
                    os.fsync(f.fileno())
                wall = time.perf_counter() - t0
                c1, f1 = daemon_counters(pid)
                enc = thread_cpu(pid).get("llmfs-encode", 0.0) - e0
                print(
                    f"write {name:7} {mib / wall:8.1f} MiB/s wall  daemon {1000 * (c1 - c0) / mib:6.2f} ms "
                    f"CPU/MiB ({1000 * enc / mib:.2f} on encoder threads), {(f1 - f0) / mib:6.0f} page faults/MiB"
                )
                try:
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                except OSError:
                    pass
                c0, f0 = daemon_counters(pid)
                t0 = time.perf_counter()
                with open(path, "rb", buffering=0) as f:
                    got = b"".join(iter(lambda f=f: f.read(1 << 20), b""))
                wall = time.perf_counter() - t0
                c1, f1 = daemon_counters(pid)
                assert got == data
                print(
                    f"read  {name:7} {mib / wall:8.1f} MiB/s wall  daemon {1000 * (c1 - c0) / mib:6.2f} ms "
                    f"CPU/MiB, {(f1 - f0) / mib:6.0f} page faults/MiB"
                )
                os.unlink(path)
        finally:
            subprocess.run([*llmfs, "umount", mnt], check=False)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=parse_size, default=64 << 20)
    p.add_argument("--write-request", type=parse_size, default=1 << 20)
    p.add_argument("--read-request", type=parse_size, default=1 << 20)
    p.add_argument("--block-size", type=parse_size, default=64 << 10)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--mount", action="store_true", help="through a real mount: the daemon's CPU per MiB")
    args = p.parse_args()
    if args.mount:
        return through_mount(args.size, args.block_size)
    mib = args.size / (1 << 20)
    heap.keep_freed_memory(DIRTY_LIMIT + GROUP_BYTES)  # as the daemon does
    with tempfile.TemporaryDirectory(prefix="seqio-") as tmp:
        path = os.path.join(tmp, "s")
        Store.create(path, args.block_size)
        for name, data in (("random", os.urandom(args.size)), ("text", text_corpus(args.size))):
            ops = open_ops(path)
            phase(f"write {name}", mib, write_file, args.profile, ops, name, data, args.write_request)
            close_ops(ops)
            ops = open_ops(path)  # a fresh decode cache, as after a remount
            got = phase(f"read {name}", mib, read_file, args.profile, ops, name, len(data), args.read_request)
            close_ops(ops)
            assert got == data


if __name__ == "__main__":
    main()
