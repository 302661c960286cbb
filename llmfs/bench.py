"""`llmfs bench fs`: filesystem throughput through a real mount against the disk under it, measured
in one run on the same bytes (ratios, not absolute numbers, are what compare across machines).

  * sequential write then read of SIZE bytes, incompressible and text, through the mount and on
    the disk the store lives on (page caches dropped before each read when we may);
  * files/s creating N small files (and reading them back);
  * the store's size for the text against zstd -3 and xz -6 of the same bytes.
"""
from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from codec.bench import bench_subparsers

from .mkfs import DEFAULT_BLOCK_SIZE, parse_size
from .store import Store

CHUNK = 1 << 20


def text_corpus(size: int) -> bytes:
    """`size` bytes of real text from this machine: licenses, Python's standard library, man-like
    docs, concatenated (and repeated only if the machine has less)."""
    parts, total = [], 0
    roots = [Path("/usr/share/common-licenses"), Path(os.__file__).parent]
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.suffix in ("", ".py", ".txt", ".rst"):
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                if b"\0" in data[:4096]:
                    continue
                parts.append(data)
                total += len(data)
                if total >= size:
                    return b"".join(parts)[:size]
    corpus = b"".join(parts)
    return (corpus * (size // len(corpus) + 1))[:size]


def drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed_write(path: Path, data: bytes) -> float:
    t = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(0, len(data), CHUNK):
            f.write(data[i:i + CHUNK])
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def timed_read(path: Path) -> float:
    drop_caches()
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass
    return time.perf_counter() - t


def small_files(root: Path, n: int) -> tuple[float, float]:
    root.mkdir()
    payload = b"small file contents\n" * 10
    t = time.perf_counter()
    for i in range(n):
        with open(root / f"f{i:05d}", "wb") as f:
            f.write(payload)
    create = n / (time.perf_counter() - t)
    drop_caches()
    t = time.perf_counter()
    for i in range(n):
        with open(root / f"f{i:05d}", "rb") as f:
            f.read()
    return create, n / (time.perf_counter() - t)


def llmfs(*args) -> None:
    subprocess.run([sys.executable, "-m", "llmfs.cli", *map(str, args)], check=True)


def run_fs(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="llmfs-bench-", dir=args.dir))
    store, mnt, disk = work / "store", work / "mnt", work / "disk"
    mnt.mkdir()
    disk.mkdir()
    llmfs("mkfs", store, "--block-size", args.block_size)
    llmfs("mount", store, mnt)
    rows = []
    try:
        datasets = {"random": os.urandom(args.size), "text": text_corpus(args.size)}
        mib = args.size / (1 << 20)
        for name, data in datasets.items():
            w_fs, w_disk = timed_write(mnt / name, data), timed_write(disk / name, data)
            r_fs, r_disk = timed_read(mnt / name), timed_read(disk / name)
            rows.append((f"write {name}", mib / w_fs, mib / w_disk, "MiB/s"))
            rows.append((f"read {name}", mib / r_fs, mib / r_disk, "MiB/s"))
        c_fs, r_fs = small_files(mnt / "small", args.files)
        c_disk, r_disk = small_files(disk / "small", args.files)
        rows.append((f"create {args.files} small files", c_fs, c_disk, "files/s"))
        rows.append((f"read {args.files} small files", r_fs, r_disk, "files/s"))
        (mnt / "random").unlink()
        shutil.rmtree(mnt / "small")
    finally:
        llmfs("umount", mnt)
    s = Store(str(store), lock=False)
    with s.read() as t:
        stored = t.counters.stored
    s.close()
    text = datasets["text"]
    zstd3 = len(zstandard.ZstdCompressor(level=3).compress(text))
    xz6 = len(lzma.compress(text, preset=6)) if args.size <= (64 << 20) else None

    print(f"llmfs bench fs: {args.size >> 20} MiB per file, block size {args.block_size}, "
          f"page cache dropped before reads: {drop_caches()}")
    print(f"{'':34} {'llmfs':>10} {'disk':>10} {'llmfs/disk':>11}")
    for label, a, b, unit in rows:
        print(f"{label:34} {a:10.1f} {b:10.1f} {a / b:10.1%}  {unit}")
    print(f"text stored: {stored} bytes = {stored / len(text):.3f} of raw; zstd -3 alone "
          f"{zstd3 / len(text):.3f}" + (f"; xz -6 {xz6 / len(text):.3f}" if xz6 else ""))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def register(subparsers) -> None:
    p = bench_subparsers(subparsers).add_parser(
        "fs", help="throughput through a mount vs the disk under it")
    p.add_argument("--size", type=parse_size, default=256 << 20, help="bytes per file (256M)")
    p.add_argument("--files", type=int, default=10_000, help="small files to create")
    p.add_argument("--block-size", type=parse_size, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--dir", default=None, help="where to put the store (default: $TMPDIR)")
    p.set_defaults(func=run_fs)
