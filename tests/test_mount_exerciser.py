"""A seeded random exerciser: 20,000 system calls, each made on the mount and on a plain
directory, must give the same result or the same errno. It covers what POSIX test suites found:
ftruncate and fstat on open descriptors, files unlinked or renamed over while open, names longer
than NAME_MAX (ENAMETOOLONG on both sides), and rename, link, symlink, mkdir/rmdir, O_APPEND,
O_TRUNC, O_EXCL, reads and writes at offsets (some across a block boundary). Writes stay small
so that the run is dominated by the calls themselves; test_mount_random.py writes large data.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import stat
import time
from pathlib import Path

import pytest

from .conftest import needs_fuse
from .treeutil import digest

pytestmark = [needs_fuse, pytest.mark.mount]

N_OPS = 20_000
SEED = 13
FILES = ["a", "b", "c", "l"]  # names file calls mostly use
SUBDIRS = ["d0", "d1"]  # names directory calls mostly use
DIRS = ["", "d0", "d1", "d0/d1"]
MAX_OPEN = 12
BLOCK = 64 << 10  # the mount's block size: offsets around it cross a block boundary


class Mismatch(AssertionError):
    pass


def attempt(call):
    try:
        return "ok", call()
    except OSError as e:
        return "err", errno.errorcode.get(e.errno, e.errno)


def short(value) -> str:
    """repr, with long names and data cut down to their length and a few bytes."""
    if isinstance(value, (bytes, str)) and len(value) > 24:
        return f"<{len(value)}: {value[:8]!r}..>"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(short, value)) + ")"
    return repr(value)


def stat_view(st: os.stat_result) -> tuple:
    """What must agree between the two sides (not times, inode numbers or directory sizes)."""
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink, size


class Exerciser:
    def __init__(self, mnt: Path, plain: Path, seed: int):
        self.roots = (mnt, plain)
        self.rng = random.Random(seed)
        # {"fds": (mount fd, plain fd), "flags": open flags, "gone": see mark_gone, "dir": bool}
        self.fds: list[dict] = []
        self.counts: dict[str, int] = {}
        self.succeeded: dict[str, int] = {}
        self.step = 0
        self.history: collections.deque[str] = collections.deque(maxlen=60)

    # -- helpers ------------------------------------------------------------------------------
    def path(self, kind: str = "file") -> str:
        """A path in the tree: usually of the kind asked for, sometimes of the other kind (for
        EISDIR, ENOTDIR, ENOTEMPTY), sometimes too long for a name."""
        r = self.rng.random()
        if r < 0.04:  # longer than NAME_MAX: the kernel passes up to 1024 bytes to FUSE
            name = "n" * self.rng.choice([256, 300, 1100])
        elif r < 0.06:
            name = "x" * 255  # exactly NAME_MAX
        else:
            usual, other = (FILES, SUBDIRS) if kind == "file" else (SUBDIRS, FILES)
            name = self.rng.choice(usual if self.rng.random() < 0.85 else other)
        d = self.rng.choice(DIRS)
        return f"{d}/{name}" if d else name

    def data(self) -> bytes:
        n = self.rng.choice([1, 7, 100, 1000, 5000])
        if self.rng.random() < 0.2:
            return bytes(n)
        return self.rng.randbytes(n)

    def offset(self) -> int:
        return self.rng.choice(
            [
                0,
                self.rng.randrange(4096),
                self.rng.randrange(BLOCK - 50, BLOCK + 50),
                self.rng.randrange(3 * BLOCK),
            ]
        )

    def both(self, name: str, call, *args) -> tuple:
        """call(root_index) on each side; the results must agree. The last calls are kept to
        say how a mismatch came about."""
        self.counts[name] = self.counts.get(name, 0) + 1
        got = [attempt(lambda i=i: call(i)) for i in (0, 1)]
        if got[1][0] == "ok":
            self.succeeded[name] = self.succeeded.get(name, 0) + 1
            if name == "fstat" and got[1][1][2] == 0:
                self.succeeded["fstat of an unlinked file"] = (
                    self.succeeded.get("fstat of an unlinked file", 0) + 1
                )
        elif got[1][1] == "ENAMETOOLONG":
            self.succeeded["ENAMETOOLONG"] = self.succeeded.get("ENAMETOOLONG", 0) + 1
        self.history.append(f"{self.step} {name}{tuple(map(short, args))} -> {short(got[1])}")
        if got[0] != got[1]:
            raise Mismatch(
                f"step {self.step}: {name}: mount {short(got[0])} vs plain "
                f"{short(got[1])}; the last calls:\n" + "\n".join(self.history)
            )
        return got[0]

    def on_paths(self, name: str, fn, *paths: str, view=lambda r: r, extra=()) -> tuple:
        return self.both(
            name,
            lambda i: view(fn(*(str(self.roots[i] / p) if p else str(self.roots[i]) for p in paths))),
            *paths,
            *extra,
        )

    def open_pair(self) -> dict | None:
        return self.rng.choice(self.fds) if self.fds else None

    def close_pair(self, pair: dict) -> None:
        self.fds.remove(pair)
        for fd in pair["fds"]:
            os.close(fd)

    # -- operations ---------------------------------------------------------------------------
    def op_open(self) -> None:
        p = self.path()
        acc = self.rng.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR])
        flags = acc
        for f, chance in ((os.O_CREAT, 0.6), (os.O_EXCL, 0.15), (os.O_TRUNC, 0.15), (os.O_APPEND, 0.15)):
            if self.rng.random() < chance:
                flags |= f
        if len(self.fds) >= MAX_OPEN:
            self.close_pair(self.rng.choice(self.fds))
        fds = []

        def opener(i):
            fd = os.open(self.roots[i] / p, flags, 0o644)
            fds.append(fd)
            return None

        kind, _ = self.both("open", opener, p, hex(flags))
        if kind == "ok":
            is_dir = stat.S_ISDIR(os.fstat(fds[1]).st_mode)
            self.fds.append({"fds": tuple(fds), "flags": flags, "gone": False, "dir": is_dir})
        else:
            for fd in fds:
                os.close(fd)

    def op_close(self) -> None:
        pair = self.open_pair()
        if pair:  # close flushes on the mount: its result counts too
            self.fds.remove(pair)
            self.both("close", lambda i: os.close(pair["fds"][i]), pair["fds"][1])

    def op_pwrite(self) -> None:
        pair = self.open_pair()
        if pair:
            data, off = self.data(), self.offset()
            self.both(
                "pwrite", lambda i: os.pwrite(pair["fds"][i], data, off), pair["fds"][1], len(data), off
            )

    def op_write(self) -> None:  # at the descriptor's position (O_APPEND: at the end)
        pair = self.open_pair()
        if pair:
            data = self.data()
            self.both("write", lambda i: os.write(pair["fds"][i], data), pair["fds"][1], len(data))

    def op_seek(self) -> None:
        pair = self.open_pair()
        if pair and not pair["dir"]:  # directory offsets are each filesystem's own cookies
            how = self.rng.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
            off = self.rng.randrange(0, 3 * BLOCK) if how == os.SEEK_SET else self.rng.randrange(-100, 100)
            self.both("lseek", lambda i: os.lseek(pair["fds"][i], off, how), pair["fds"][1], off, how)

    def op_read(self) -> None:
        pair = self.open_pair()
        if pair:
            n = self.rng.choice([1, 100, 5000, BLOCK + 10])
            if self.rng.random() < 0.5:
                off = self.offset()
                self.both("pread", lambda i: os.pread(pair["fds"][i], n, off), pair["fds"][1], n, off)
            else:
                self.both("read", lambda i: os.read(pair["fds"][i], n), pair["fds"][1], n)

    def op_ftruncate(self) -> None:
        pair = self.open_pair()
        if pair:
            size = self.rng.choice([0, self.rng.randrange(100), self.rng.randrange(3 * BLOCK)])
            self.both("ftruncate", lambda i: os.ftruncate(pair["fds"][i], size), pair["fds"][1], size)

    def op_fstat(self) -> None:
        pair = self.open_pair()
        if pair and not pair["gone"]:
            self.both("fstat", lambda i: stat_view(os.fstat(pair["fds"][i])), pair["fds"][1])

    def op_fsync(self) -> None:
        pair = self.open_pair()
        if pair:
            self.both("fsync", lambda i: os.fsync(pair["fds"][i]), pair["fds"][1])

    def op_unlink(self) -> None:
        self.on_paths("unlink", os.unlink, self.path())

    def op_rmdir(self) -> None:
        p = self.path("dir")
        self.mark_gone(p)
        self.on_paths("rmdir", os.rmdir, p)

    def op_mkdir(self) -> None:
        self.on_paths("mkdir", lambda q: os.mkdir(q, 0o755), self.path("dir"))

    def op_rename(self) -> None:
        kind = "dir" if self.rng.random() < 0.3 else "file"
        a, b = self.path(kind), self.path(kind)
        self.mark_gone(b)  # a directory renamed over is gone like an rmdir'd one
        self.on_paths("rename", os.rename, a, b)

    def op_link(self) -> None:
        self.on_paths("link", os.link, self.path(), self.path())

    def op_symlink(self) -> None:
        target = self.rng.choice(FILES + ["../" + self.rng.choice(FILES), "nowhere"])
        self.on_paths("symlink", lambda q: os.symlink(target, q), self.path())

    def op_readlink(self) -> None:
        self.on_paths("readlink", os.readlink, self.path())

    def op_truncate(self) -> None:
        size = self.rng.choice([0, self.rng.randrange(100), self.rng.randrange(3 * BLOCK)])
        self.on_paths("truncate", lambda q: os.truncate(q, size), self.path())

    def op_stat(self) -> None:
        fn = self.rng.choice([os.stat, os.lstat])
        self.on_paths(fn.__name__, fn, self.path(), view=stat_view)

    def op_chmod(self) -> None:
        mode = self.rng.choice([0o644, 0o600, 0o755, 0o000, 0o4755])
        self.on_paths("chmod", lambda q: os.chmod(q, mode), self.path())

    def op_chown(self) -> None:
        self.on_paths("chown", lambda q: os.chown(q, os.getuid(), os.getgid()), self.path())

    def op_utime(self) -> None:
        self.on_paths("utime", os.utime, self.path())

    def op_listdir(self) -> None:
        self.on_paths("listdir", os.listdir, self.rng.choice(DIRS), view=sorted)

    def mark_gone(self, path: str) -> None:
        """fstat of an open directory that is removed, or of a file unlinked while open in it,
        fails with ESTALE on the mount (libfuse keeps no path for them; fuseops.py). Reads,
        writes and ftruncate still go by the handle; only fstat is left out for those."""
        gone = os.path.join(str(self.roots[1]), path)
        for pair in self.fds:
            where = os.readlink(f"/proc/self/fd/{pair['fds'][1]}").removesuffix(" (deleted)")
            if where == gone or where.startswith(gone + "/"):
                pair["gone"] = True

    OPS = [
        ("open", 14),
        ("close", 5),
        ("pwrite", 12),
        ("write", 5),
        ("seek", 3),
        ("read", 10),
        ("ftruncate", 7),
        ("fstat", 6),
        ("fsync", 1),
        ("unlink", 6),
        ("rmdir", 2),
        ("mkdir", 3),
        ("rename", 6),
        ("link", 3),
        ("symlink", 2),
        ("readlink", 1),
        ("truncate", 3),
        ("stat", 6),
        ("chmod", 2),
        ("chown", 1),
        ("utime", 1),
        ("listdir", 2),
    ]

    def run(self, n: int) -> None:
        names, weights = zip(*self.OPS)
        methods = [getattr(self, "op_" + name) for name in names]
        try:
            for self.step in range(n):
                self.rng.choices(methods, weights)[0]()
        finally:  # also on a mismatch: open files would keep the mount busy
            for pair in list(self.fds):
                self.close_pair(pair)


def test_random_system_calls_match_a_plain_directory(mounted, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    ex = Exerciser(mounted.mnt, plain, SEED)
    t0 = time.monotonic()
    ex.run(N_OPS)
    print(f"{N_OPS} operations in {time.monotonic() - t0:.1f} s")
    # every kind of call ran, and succeeded often enough to mean something
    calls = [
        "open",
        "close",
        "pwrite",
        "write",
        "lseek",
        "pread",
        "read",
        "ftruncate",
        "fstat",
        "fsync",
        "unlink",
        "rmdir",
        "mkdir",
        "rename",
        "link",
        "symlink",
        "readlink",
        "truncate",
        "stat",
        "lstat",
        "chmod",
        "chown",
        "utime",
        "listdir",
    ]
    rare = {name: ex.succeeded.get(name, 0) for name in calls if ex.succeeded.get(name, 0) < N_OPS // 2000}
    assert not rare, (rare, ex.succeeded)
    for what in ("ftruncate", "fstat of an unlinked file", "ENAMETOOLONG"):
        assert ex.succeeded.get(what, 0) >= N_OPS // 200, (what, ex.succeeded)
    assert digest(mounted.mnt) == digest(plain)
    mounted.remount()
    assert digest(mounted.mnt) == digest(plain)
