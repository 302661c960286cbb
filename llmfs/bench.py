"""`llmfs bench fs`: filesystem throughput through a real mount against the disk under it, measured
in one run on the same bytes (ratios, not absolute numbers, are what compare across machines).

  * sequential write then read of SIZE bytes, incompressible and text, through the mount and on
    the disk the store lives on (page caches dropped before each read when we may);
  * files/s creating N small files of 1 KiB in one process (open, write, close; then open, read,
    close) through the mount, through the smallest in-memory filesystem of the same FUSE binding
    (llmfs/memfs.py: the binding's floor, mounted by the bench in a subprocess and always
    unmounted) and on the disk;
  * a `tar x` of a source tree of ~20,000 files and a `git clone --no-local` of a repository,
    through the mount and on the disk;
  * the store's size for the text against zstd -3 and xz -6 of the same bytes.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from llmfs.codec.bench import bench_subparsers

from .mkfs import DEFAULT_BLOCK_SIZE
from .store import Store
from .units import parse_size

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
            f.write(data[i : i + CHUNK])
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
    payload = (b"small file contents\n" * 52)[:1024]
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


@contextlib.contextmanager
def memfs_mount(mnt: Path):
    """The binding's floor (llmfs/memfs.py) mounted on mnt for the duration of the block."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmfs.memfs", str(mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the in-memory filesystem did not mount")
            time.sleep(0.05)
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def source_tar(dst: Path, files: int, limit: int = 256 << 20, largest: int = 256 << 10) -> tuple[int, int]:
    """A tar of up to `files` files (and `limit` bytes) of source and docs from this machine:
    Python's standard library, the C headers of /usr/include, then /usr/share/doc and
    /usr/share. Files over `largest` bytes are left out: a source tree's files are small, and a
    few big data files would spend the size bound (a Debian machine then yields ~17,000 files
    instead of 20,000). Returns (files, bytes)."""
    import tarfile

    n = total = 0
    roots = [Path(os.__file__).parent, Path("/usr/include"), Path("/usr/share/doc"), Path("/usr/share")]
    seen = set()
    with tarfile.open(dst, "w") as tar:
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
                for name in sorted(filenames):
                    p = Path(dirpath) / name
                    if n >= files or p in seen or not p.is_file() or p.is_symlink():
                        continue
                    size = p.stat().st_size
                    if total + size > limit or size > largest:
                        continue
                    try:
                        tar.add(p, arcname=f"tree/{root.name}/{p.relative_to(root)}")
                    except OSError:
                        continue
                    seen.add(p)
                    n += 1
                    total += size
    return n, total


def timed_run(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def tools_rows(mnt: Path, disk: Path, work: Path, files: int, repo: str | None) -> list:
    """`tar x` of a source tree and `git clone --no-local` of a repository, mount vs disk."""
    rows = []
    tar = work / "tree.tar"
    n, size = source_tar(tar, files)
    secs = {}
    for where, root in (("fs", mnt), ("disk", disk)):
        d = root / "tarx"
        d.mkdir()
        drop_caches()
        secs[where] = timed_run(["tar", "xf", str(tar)], d)
    rows.append((f"tar x {n} files, {size >> 20} MiB", n / secs["fs"], n / secs["disk"], "files/s"))
    tar.unlink()
    if repo:
        for where, root in (("fs", mnt), ("disk", disk)):
            secs[where] = timed_run(["git", "clone", "-q", "--no-local", repo, str(root / "clone")], root)
        rows.append((f"git clone --no-local {Path(repo).name}", 1 / secs["fs"], 1 / secs["disk"], "clones/s"))
    return rows


def work_dir(args, what: str) -> Path | None:
    """A fresh directory for one bench run under --dir (default $TMPDIR), or None after saying
    in words why it cannot be made (a --dir that does not exist or is not writable: rc 2)."""
    try:
        return Path(tempfile.mkdtemp(prefix="llmfs-bench-", dir=args.dir))
    except OSError as e:
        print(
            f"llmfs bench {what}: cannot make a directory in {args.dir or tempfile.gettempdir()}: "
            f"{e.strerror or e}",
            file=sys.stderr,
        )
        return None


def run_fs(args) -> int:
    work = work_dir(args, "fs")
    if work is None:
        return 2
    store, mnt, disk, floor = work / "store", work / "mnt", work / "disk", work / "memfs"
    for d in (mnt, disk, floor):
        d.mkdir()
    llmfs("mkfs", store, "--block-size", args.block_size)
    llmfs("mount", store, mnt)
    rows, small = [], []
    try:
        datasets = {"random": os.urandom(args.size), "text": text_corpus(args.size)}
        mib = args.size / (1 << 20)
        for name, data in datasets.items():
            w_fs, w_disk = timed_write(mnt / name, data), timed_write(disk / name, data)
            r_fs, r_disk = timed_read(mnt / name), timed_read(disk / name)
            with memfs_mount(floor):  # the binding's own floor for the same requests
                w_mem, r_mem = timed_write(floor / name, data), timed_read(floor / name)
            rows.append((f"write {name}", mib / w_fs, mib / w_disk, "MiB/s", mib / w_mem))
            rows.append((f"read {name}", mib / r_fs, mib / r_disk, "MiB/s", mib / r_mem))
        (mnt / "random").unlink()
        (disk / "random").unlink()
        stored = int(os.getxattr(mnt / "text", "user.llmfs.stored_size"))
        rounds = args.rounds if args.files > 0 else 0
        for k in range(rounds):  # the best of several rounds: the machine may be busy
            c_fs, r_fs = small_files(mnt / f"small{k}", args.files)
            c_disk, r_disk = small_files(disk / f"small{k}", args.files)
            with memfs_mount(floor):
                c_mem, r_mem = small_files(floor / "small", args.files)
            small.append((c_fs, c_mem, c_disk, r_fs, r_mem, r_disk))
            shutil.rmtree(mnt / f"small{k}")
            shutil.rmtree(disk / f"small{k}")
        if args.tree_files:
            rows += tools_rows(mnt, disk, work, args.tree_files, args.repo)
    finally:
        llmfs("umount", mnt)
    text = datasets["text"]
    zstd3 = len(zstandard.ZstdCompressor(level=3).compress(text))
    xz6 = len(lzma.compress(text, preset=6)) if args.size <= (64 << 20) else None

    print(
        f"llmfs bench fs: {args.size >> 20} MiB per file, block size {args.block_size}, "
        f"page cache dropped before reads: {drop_caches()}"
    )
    print(
        "memfs = the smallest in-memory filesystem on the same binding (llmfs/memfs.py): the floor "
        "of the kernel, libfuse and mfusepy for the same requests"
    )
    print(f"{'':34} {'llmfs':>10} {'disk':>10} {'llmfs/disk':>11} {'memfs':>10} {'llmfs/memfs':>12}")
    for label, a, b, unit, *mem in rows:
        floor = f" {mem[0]:10.1f} {a / mem[0]:11.1%}" if mem else f" {'':10} {'':11}"
        print(f"{label:34} {a:10.1f} {b:10.1f} {a / b:10.1%}{floor}  {unit}")
    if small:
        small_rows(small, args)
    print(
        f"text stored: {stored} bytes = {stored / len(text):.3f} of raw; zstd -3 alone "
        f"{zstd3 / len(text):.3f}" + (f"; xz -6 {xz6 / len(text):.3f}" if xz6 else "")
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


def small_rows(small: list, args) -> None:
    """The small-file rows of `bench fs`: the best round and every round."""
    print(
        f"small files of 1 KiB, {args.files} per round, one process; memfs = the smallest "
        f"in-memory filesystem on the same binding (the floor); best of {len(small)}:"
    )
    print(f"{'':34} {'llmfs':>10} {'memfs':>10} {'disk':>10} {'/memfs':>8} {'/disk':>8}")
    for label, i in (("create+write+close", 0), ("open+read+close", 3)):
        best = max(small, key=lambda r: r[i] / r[i + 1])
        a, m, d = best[i : i + 3]
        print(f"{label:34} {a:10.0f} {m:10.0f} {d:10.0f} {a / m:8.1%} {a / d:8.1%}  files/s")
        for r in small:
            print(f"{'  round':34} {r[i]:10.0f} {r[i + 1]:10.0f} {r[i + 2]:10.0f} {r[i] / r[i + 1]:8.1%}")


def register(subparsers) -> None:
    p = bench_subparsers(subparsers).add_parser("fs", help="throughput through a mount vs the disk under it")
    p.add_argument("--size", type=parse_size, default=256 << 20, help="bytes per file (256M)")
    p.add_argument(
        "--files", type=int, default=3_000, help="small files per round (3000; 0: no small-file rows)"
    )
    p.add_argument("--rounds", type=int, default=3, help="small-file rounds; the best counts (3)")
    p.add_argument(
        "--tree-files",
        type=int,
        default=20_000,
        help="files in the tree that `tar x` unpacks (20000; 0: no tar/git rows)",
    )
    p.add_argument(
        "--repo",
        default=str(Path(__file__).resolve().parent.parent)
        if (Path(__file__).resolve().parent.parent / ".git").exists()
        else None,
        help="a git repository to clone --no-local (default: llmfs's own checkout)",
    )
    p.add_argument("--block-size", type=parse_size, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--dir", default=None, help="where to put the store (default: $TMPDIR)")
    p.set_defaults(func=run_fs)
    _register_compaction(subparsers)
    _register_cache(subparsers)


def text_tree(dst: Path, limit: int) -> int:
    """Copy real text files (licenses, Python's standard library) into dst, up to `limit` bytes.
    Returns the bytes copied."""
    total = 0
    sources = sorted(Path("/usr/share/common-licenses").iterdir()) + sorted(
        Path(os.__file__).parent.glob("*.py")
    )
    dst.mkdir(parents=True)
    for src in sources:
        if not src.is_file() or src.is_symlink():
            continue
        size = src.stat().st_size
        if total + size > limit:
            continue
        shutil.copyfile(src, dst / src.name)
        total += size
    return total


def xz_per_block(files: list[Path], block_size: int) -> int:
    """xz -9e of every file's blocks compressed one by one: the baseline for a store whose blocks
    decode independently (damage to one costs only its reads; a read decodes only its blocks),
    where the tar's xz is solid — it finds a file's text again in any earlier file."""
    import lzma

    total = 0
    for p in files:
        data = p.read_bytes()
        for i in range(0, len(data), block_size):
            total += len(lzma.compress(data[i : i + block_size], preset=9 | lzma.PRESET_EXTREME))
    return total


def timed_copy(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    shutil.copytree(src, dst)
    subprocess.run(["sync", "-f", str(dst)], check=True)
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # on llmfs: commits the group, so a reader of the store sees the tree
    finally:
        os.close(fd)
    return time.perf_counter() - t


def run_compaction(args) -> int:
    """Write throughput with compaction idle vs running, compaction speed against the int8 GEMM
    peak, and the final ratio against xz -9e and zstd -19 of the same tree as a tar (and against
    xz -9e of its blocks one by one, the independent blocks a store keeps); then a fresh
    daemon reads every file back and compares it with the source, and fsck checks the store.
    Exit status 1 if any file differs or fsck is not clean."""
    import io
    import tarfile
    import threading

    from llmfs.codec.bench import baselines, int8_peak_ops, ops_per_token
    from llmfs.codec.lm import open_codec

    work = work_dir(args, "compaction")
    if work is None:
        return 2
    store, mnt = work / "store", work / "mnt"
    mnt.mkdir()
    size = text_tree(work / "tree", args.size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(work / "tree", arcname="tree")
    tar_bytes = buf.getvalue()
    llmfs("mkfs", store, "--block-size", args.block_size, *(["--model", args.model] if args.model else []))
    llmfs("mount", store, mnt, "--no-compaction")
    load = text_corpus(args.write_size)  # the write workload, measured idle and busy
    try:
        timed_copy(work / "tree", mnt / "tree")
        idle = timed_write(mnt / "load-idle", load)
        os.unlink(mnt / "load-idle")
        if args.tune:  # the store's dictionary from the tree (llmfs tune needs the store unmounted)
            llmfs("umount", mnt)
            llmfs("tune", store)
            llmfs("mount", store, mnt, "--no-compaction")
        s = Store(str(store), lock=False, readonly=True)
        with s.read() as t:
            zstd_stored = t.counters.stored
        s.close()
        # compaction runs in the daemon while a second copy of the tree is written
        result = {}

        def compact():
            t0 = time.perf_counter()
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "llmfs.cli",
                    "compact",
                    str(mnt),
                    "--now",
                    "--path",
                    str(mnt / "tree"),
                ],
                capture_output=True,
                text=True,
            )
            result.update(seconds=time.perf_counter() - t0, out=res.stdout + res.stderr)

        worker = threading.Thread(target=compact)
        worker.start()
        time.sleep(5)  # let the model load and start
        busy = timed_write(mnt / "load-busy", load)
        busy_done = worker.is_alive()
        worker.join()
        os.unlink(mnt / "load-busy")
    finally:
        llmfs("umount", mnt)
    s = Store(str(store), lock=False, readonly=True)
    with s.read() as t:
        c = t.counters
        lm_plain = c.per_codec[2][1]
        stored = c.stored
    s.close()
    # a fresh daemon reads every file back (decoding every LM block) and compares with the source
    llmfs("mount", store, mnt, "--no-compaction")
    try:
        t0 = time.perf_counter()
        differ = [
            p.name
            for p in sorted((work / "tree").iterdir())
            if (mnt / "tree" / p.name).read_bytes() != p.read_bytes()
        ]
        readback = time.perf_counter() - t0
    finally:
        llmfs("umount", mnt)
    fsck = subprocess.run(
        [sys.executable, "-m", "llmfs.cli", "fsck", str(store), *([] if args.full_fsck else ["--quick"])],
        capture_output=True,
        text=True,
    )
    codec = open_codec(args.model or None, threads=1)
    tokens = len(codec.tokenizer.encode(b"".join(p.read_bytes() for p in sorted((work / "tree").iterdir()))))
    peak = int8_peak_ops()
    per_token = ops_per_token(codec.engine, codec.segment_tokens)
    base = baselines(tar_bytes)
    blockwise = xz_per_block(sorted((work / "tree").iterdir()), args.block_size)
    tok_s = tokens / result["seconds"]
    print(
        f"llmfs bench compaction: {size} bytes of text in {len(list((work / 'tree').iterdir()))}"
        f" files, block size {args.block_size}"
    )
    wmib = len(load) / (1 << 20)
    print(f"write {wmib:.0f} MiB, compaction idle     {wmib / idle:8.1f} MiB/s")
    print(
        f"write {wmib:.0f} MiB, compaction running  {wmib / busy:8.1f} MiB/s  "
        f"({busy / idle:.2f}x the time{'' if busy_done else '; compaction ended first'})"
    )
    print(
        f"compaction (encode + verify) {size / result['seconds'] / 1024:8.1f} KiB/s, "
        f"{tok_s:.0f} tokens/s = {tok_s * per_token / peak:.2%} of the int8 GEMM peak "
        f"({peak / 1e12:.2f} TOP/s, {per_token / 1e6:.0f} MOP/token)"
    )
    print(f"LM-compressed fraction     {lm_plain / size:.1%}")
    print(
        f"stored: zstd tier {zstd_stored}, after compaction {stored} "
        f"({stored / zstd_stored:.3f} of the zstd tier)"
    )
    for name, n in base.items():
        print(f"  tar of the tree, {name:<10} {n:>10}  llmfs/that = {stored / n:.3f}")
    print(
        f"  each block alone, xz -9e {blockwise:>9}  llmfs/that = {stored / blockwise:.3f}  "
        f"(the tar's solid xz is {base['xz -9e'] / blockwise:.3f} of it)"
    )
    print(result["out"].strip().splitlines()[-1] if result["out"].strip() else "")
    print(
        f"after unmount and mount: {len(differ)} of {len(list((work / 'tree').iterdir()))} files "
        f"differ{': ' + ', '.join(differ[:5]) if differ else ''}; cold read of the tree "
        f"{size / readback / 1024:.1f} KiB/s ({readback:.0f} s)"
    )
    print(
        f"fsck{'' if args.full_fsck else ' --quick'}: exit {fsck.returncode}"
        f"{'' if fsck.returncode == 0 else chr(10) + fsck.stdout + fsck.stderr}"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 1 if differ or fsck.returncode else 0


def _register_compaction(subparsers) -> None:
    p = bench_subparsers(subparsers).add_parser(
        "compaction", help="LM compaction of a text tree: speed, effect on writes, final ratio"
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default=256 << 10,
        help="bytes of text to copy (default 256K: the CPU engine is slow)",
    )
    p.add_argument(
        "--write-size",
        type=parse_size,
        default=64 << 20,
        help="bytes written to measure write throughput idle and during compaction",
    )
    p.add_argument("--block-size", type=parse_size, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--model", default=None)
    p.add_argument("--dir", default=None)
    p.add_argument(
        "--tune",
        action="store_true",
        help="run `llmfs tune` on the store before compacting (its dictionary from the tree)",
    )
    p.add_argument(
        "--full-fsck",
        action="store_true",
        help="fsck decodes every block once more (the read-back already decoded each)",
    )
    p.set_defaults(func=run_compaction)


def daemon_rss(store: Path) -> int:
    """Resident bytes of the daemon serving `store` (its pid is in the store's lock file)."""
    pid = next(int(w) for w in (store / "llmfs.lock").read_text().split() if w.isdigit())
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def timed_read_ttfb(path: Path) -> tuple[float, float]:
    """(seconds to the first byte, seconds for the whole file), page cache dropped first."""
    drop_caches()
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.read(4096)
        first = time.perf_counter() - t
        while f.read(CHUNK):
            pass
    return first, time.perf_counter() - t


def run_cache(args) -> int:
    """Cold and hot reads of an LM-compacted text file against the same file in the zstd tier."""
    work = work_dir(args, "cache")
    if work is None:
        return 2
    text = text_corpus(args.size)
    mounts = {}
    threads = ["--threads", args.threads] if args.threads else []
    try:
        for name in ("lm", "zstd"):
            store, mnt = work / f"{name}.store", work / f"{name}.mnt"
            mnt.mkdir()
            llmfs("mkfs", store, "--block-size", args.block_size)
            llmfs("mount", store, mnt, "--no-compaction", "--cache-size", args.cache_size, *threads)
            mounts[name] = (store, mnt)
            (mnt / "f").write_bytes(text)
        store, mnt = mounts["lm"]
        t = time.perf_counter()
        llmfs("compact", mnt, "--now")
        compact_s = time.perf_counter() - t
        llmfs("umount", mnt)  # a fresh daemon: nothing decoded yet
        llmfs("mount", store, mnt, "--no-compaction", "--cache-size", args.cache_size, *threads)
        cold_ttfb, cold = timed_read_ttfb(mnt / "f")
        hot_ttfb, hot = timed_read_ttfb(mnt / "f")
        rss = daemon_rss(store)
        _, zstd = timed_read_ttfb(mounts["zstd"][1] / "f")
    finally:
        for _store, mnt in mounts.values():
            subprocess.run([sys.executable, "-m", "llmfs.cli", "umount", str(mnt)])
    mib = len(text) / (1 << 20)
    budget = parse_size(str(args.cache_size))
    print(
        f"llmfs bench cache: {len(text)} bytes of text, block size {args.block_size}, "
        f"RAM budget {budget >> 20} MiB, engine threads {args.threads or 'default'} "
        f"(compaction took {compact_s:.0f} s)"
    )
    print(f"cold first read   time to first byte {cold_ttfb:8.3f} s, {mib / cold:8.3f} MiB/s")
    print(f"hot re-read       time to first byte {hot_ttfb:8.4f} s, {mib / hot:8.1f} MiB/s")
    print(
        f"zstd-tier read    {mib / zstd:8.1f} MiB/s; hot LM re-read = {zstd / hot:.0%} of it (target >= 50%)"
    )
    print(
        f"daemon resident memory {rss / (1 << 20):.0f} MiB with a {budget >> 20} MiB cache "
        f"budget (the rest: Python, torch and the model)"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _register_cache(subparsers) -> None:
    p = bench_subparsers(subparsers).add_parser(
        "cache", help="cold and hot reads of an LM-compacted file vs the zstd tier"
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default=4 << 20,
        help="bytes of text (default 4M; the CPU engine needs hours for that)",
    )
    p.add_argument("--block-size", type=parse_size, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--cache-size", default="64M")
    p.add_argument("--threads", type=int, default=None, help="the daemons' engine threads (mount --threads)")
    p.add_argument("--dir", default=None)
    p.set_defaults(func=run_cache)
