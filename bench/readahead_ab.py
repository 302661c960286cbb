"""Sequential reads through a mount against the disk under it, for several sizes of the kernel's
readahead window on the mount's device (read_ahead_kb of its FUSE bdi; root only), alternated
round by round in one run so that a busy machine's swings fall on every setting alike.

Prints per setting and round the MiB/s of a cold `read(2)` loop of 1 MiB requests (page cache
dropped first) through llmfs and of the same file on the disk, their ratio, the daemon's CPU
milliseconds per MiB, and the load average.

    python bench/readahead_ab.py --size 256M --window 1024 4096 --rounds 3 [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmfs.bench import drop_caches, text_corpus, timed_read, timed_write
from llmfs.units import parse_size


def daemon_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=parse_size, default=256 << 20)
    p.add_argument("--window", type=int, nargs="+", default=[1024, 4096], help="read_ahead_kb values")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    if not drop_caches():
        print("needs root: the page cache must be dropped and read_ahead_kb written", file=sys.stderr)
        return 2
    llmfs = [sys.executable, "-m", "llmfs.cli"]
    mib = args.size / (1 << 20)
    with tempfile.TemporaryDirectory(prefix="ra-", dir=args.dir) as tmp:
        store, mnt, disk = Path(tmp, "s"), Path(tmp, "m"), Path(tmp, "d")
        mnt.mkdir()
        disk.mkdir()
        subprocess.run([*llmfs, "mkfs", store], check=True, capture_output=True)
        subprocess.run([*llmfs, "mount", store, mnt, "--no-compaction"], check=True)
        try:
            lock = (store / "llmfs.lock").read_text().split()
            pid = int(lock[lock.index("pid") + 1])
            st = os.stat(mnt)
            knob = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
            for name, data in (("random", os.urandom(args.size)), ("text", text_corpus(args.size))):
                timed_write(mnt / name, data)
                timed_write(disk / name, data)
                for r in range(args.rounds):
                    for kb in args.window:
                        knob.write_text(f"{kb}\n")
                        load = os.getloadavg()[0]
                        c0 = daemon_cpu(pid)
                        t_fs = timed_read(mnt / name)
                        cpu = daemon_cpu(pid) - c0
                        t_disk = timed_read(disk / name)
                        print(
                            f"read {name:6} round {r} read_ahead_kb {kb:5}: llmfs {mib / t_fs:7.1f} MiB/s, "
                            f"disk {mib / t_disk:7.1f}, llmfs/disk {t_disk / t_fs:6.1%}, daemon "
                            f"{1000 * cpu / mib:5.2f} ms CPU/MiB, load {load:.1f}",
                            flush=True,
                        )
                time.sleep(0.1)
        finally:
            subprocess.run([*llmfs, "umount", mnt], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
