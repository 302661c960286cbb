"""POSIX corners through a real mount: ftruncate on an open descriptor, the temporary-file
idiom (fstat, read, write, ftruncate on a file whose last name is gone), and names longer than
NAME_MAX, which must fail with ENAMETOOLONG from every call that takes a path."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from .conftest import needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

BLOCK = 64 << 10


def test_ftruncate_on_open_descriptor_shrinks_and_extends(mounted):
    p = mounted.mnt / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 0)  # the case that failed: create, then ftruncate through the descriptor
        assert os.fstat(fd).st_size == 0
        data = bytes(range(256)) * 1000  # 256,000 bytes: blocks 0..3
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, BLOCK + 10)  # shrink into the middle of block 1, data still buffered
        assert os.fstat(fd).st_size == BLOCK + 10
        os.ftruncate(fd, 3 * BLOCK + 5)  # extend: the cut-off bytes must come back as zeros
        want = data[: BLOCK + 10] + bytes(3 * BLOCK + 5 - (BLOCK + 10))
        assert os.pread(fd, 4 * BLOCK, 0) == want
        os.fsync(fd)
        os.ftruncate(fd, 7)  # shrink after the data reached the store
        assert os.pread(fd, 100, 0) == data[:7]
        os.ftruncate(fd, 1 << 20)  # extend far: a hole
        assert os.fstat(fd).st_size == 1 << 20
        assert os.pread(fd, 16, (1 << 20) - 16) == bytes(16)
    finally:
        os.close(fd)
    assert p.stat().st_size == 1 << 20
    fd = os.open(p, os.O_WRONLY)  # a write-only descriptor of an existing file
    try:
        os.ftruncate(fd, 3)
    finally:
        os.close(fd)
    assert p.read_bytes() == data[:3]
    mounted.remount()
    assert p.read_bytes() == data[:3]


def test_open_unlinked_file_keeps_working(mounted):
    """The temporary-file idiom: open, unlink, then use the descriptor."""
    p = mounted.mnt / "tmpfile"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"x" * 5000)
        os.unlink(p)
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == 5000 and stat.S_ISREG(st.st_mode)
        assert os.listdir(mounted.mnt) == []  # nothing shows where it was (no .fuse_hidden*)
        assert not p.exists()
        os.pwrite(fd, b"hello", 10_000)
        assert os.fstat(fd).st_size == 10_005
        os.ftruncate(fd, 10_002)
        assert os.pread(fd, 20, 9_995) == bytes(5) + b"he"
        os.ftruncate(fd, 3 * BLOCK)
        assert os.fstat(fd).st_size == 3 * BLOCK and os.fstat(fd).st_nlink == 0
        os.fchmod(fd, 0o640)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640
        os.fsync(fd)
        assert os.pread(fd, 4, 0) == b"xxxx"
        p.write_bytes(b"new")  # the old name is free for a new file
        assert os.pread(fd, 4, 0) == b"xxxx" and p.read_bytes() == b"new"
        assert os.listdir(mounted.mnt) == ["tmpfile"]
    finally:
        os.close(fd)
    assert p.read_bytes() == b"new"
    assert os.listdir(mounted.mnt) == ["tmpfile"]


def test_unlinked_open_hard_link_and_renamed_over_file(mounted):
    a, b = mounted.mnt / "a", mounted.mnt / "b"
    a.write_bytes(b"one")
    os.link(a, b)
    fd = os.open(a, os.O_RDWR)
    try:
        os.unlink(a)
        assert os.fstat(fd).st_nlink == 1 and b.stat().st_nlink == 1  # one name left
        os.pwrite(fd, b"ONE", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert b.read_bytes() == b"ONE" and sorted(os.listdir(mounted.mnt)) == ["b"]

    c = mounted.mnt / "c"
    c.write_bytes(b"replacement")
    fd = os.open(b, os.O_RDONLY)
    try:
        os.rename(c, b)  # over the open file: its descriptor keeps the old data
        assert os.fstat(fd).st_nlink == 0
        assert os.read(fd, 100) == b"ONE"
        assert b.read_bytes() == b"replacement"
        assert sorted(os.listdir(mounted.mnt)) == ["b"]
    finally:
        os.close(fd)
    mounted.remount()
    assert sorted(os.listdir(mounted.mnt)) == ["b"] and b.read_bytes() == b"replacement"


def _errno_of(call) -> int | None:
    try:
        call()
    except OSError as e:
        return e.errno
    return None


def test_cached_attributes_of_hard_links_follow_changes_through_the_other_name(mounted):
    """The kernel caches attributes per name (libfuse gives each name its own kernel inode), for
    the mount's attr_timeout: every change through one name must reach what stat shows through
    the others at once — nlink after ln and unlink, mode, owner's times, size after a write or a
    truncate by descriptor, and the pages read through the other name."""
    d = mounted.mnt / "hl"
    d.mkdir()
    a, b, c = d / "a", d / "b", d / "c"
    a.write_bytes(b"one")
    assert a.stat().st_nlink == 1  # cached now
    os.link(a, b)
    assert a.stat().st_nlink == b.stat().st_nlink == 2
    assert b.read_bytes() == b"one"  # b's pages cached
    os.chmod(b, 0o600)
    assert stat.S_IMODE(a.stat().st_mode) == 0o600
    os.utime(a, ns=(10**18, 10**18))
    assert b.stat().st_mtime_ns == 10**18
    fd = os.open(a, os.O_WRONLY)
    try:
        os.pwrite(fd, b"three", 0)
        assert b.stat().st_size == 5 and b.read_bytes() == b"three"
        os.ftruncate(fd, 2)
        assert b.stat().st_size == 2 and b.read_bytes() == b"th"
        os.fchmod(fd, 0o640)
        assert stat.S_IMODE(b.stat().st_mode) == 0o640
    finally:
        os.close(fd)
    os.setxattr(a, "user.k", b"v")
    assert os.getxattr(b, "user.k") == b"v"
    os.link(b, c)
    assert a.stat().st_nlink == 3
    os.rename(d, mounted.mnt / "hl2")  # the remembered names move with their directory
    a, b, c = (mounted.mnt / "hl2" / n for n in "abc")
    os.unlink(a)
    assert b.stat().st_nlink == c.stat().st_nlink == 2
    b.write_bytes(b"x")  # truncates through b: c sees it
    assert c.read_bytes() == b"x" and c.stat().st_size == 1
    other = mounted.mnt / "hl2" / "other"
    other.write_bytes(b"other file")
    os.rename(other, b)  # b now names another file; c lost a link
    assert c.stat().st_nlink == 1 and b.read_bytes() == b"other file"


@pytest.mark.parametrize("length", [256, 1000, 1100])
def test_names_longer_than_name_max(mounted, length):
    mnt = mounted.mnt
    (mnt / "file").write_bytes(b"x")
    (mnt / "dir").mkdir()
    long_ = str(mnt / ("n" * length))
    deep = str(mnt / "dir" / ("d" * length))
    f = str(mnt / "file")
    calls = {
        "stat": lambda: os.stat(long_),
        "lstat": lambda: os.lstat(deep),
        "chmod": lambda: os.chmod(long_, 0o600),
        "chown": lambda: os.chown(long_, os.getuid(), os.getgid()),
        "link to": lambda: os.link(f, long_),
        "link from": lambda: os.link(long_, str(mnt / "x")),
        "rename to": lambda: os.rename(f, long_),
        "rename from": lambda: os.rename(long_, str(mnt / "x")),
        "rmdir": lambda: os.rmdir(long_),
        "truncate": lambda: os.truncate(long_, 0),
        "unlink": lambda: os.unlink(deep),
        "open": lambda: os.open(long_, os.O_RDONLY),
        "create": lambda: os.open(long_, os.O_WRONLY | os.O_CREAT, 0o644),
        "mkdir": lambda: os.mkdir(deep),
        "symlink": lambda: os.symlink("target", long_),
        "utime": lambda: os.utime(long_),
        "readlink": lambda: os.readlink(long_),
    }
    got = {name: _errno_of(call) for name, call in calls.items()}
    assert got == {name: errno.ENAMETOOLONG for name in calls}
    assert sorted(os.listdir(mnt)) == ["dir", "file"] and os.listdir(mnt / "dir") == []


def test_name_of_exactly_name_max_bytes_works(mounted):
    name = "é" * 127 + "x"  # 255 bytes in UTF-8
    p = mounted.mnt / name
    p.write_bytes(b"ok")
    os.rename(p, mounted.mnt / (name[:-1] + "y"))
    assert os.listdir(mounted.mnt) == [name[:-1] + "y"]
    assert (mounted.mnt / (name[:-1] + "y")).read_bytes() == b"ok"


def test_unlinked_open_file_in_a_renamed_directory(mounted):
    d = mounted.mnt / "d"
    d.mkdir()
    fd = os.open(d / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"abc")
        os.unlink(d / "f")
        os.rename(d, mounted.mnt / "e")
        assert os.fstat(fd).st_nlink == 0 and os.fstat(fd).st_size == 3
        os.ftruncate(fd, 1)
        assert os.pread(fd, 10, 0) == b"a" and os.listdir(mounted.mnt / "e") == []
    finally:
        os.close(fd)


def test_o_trunc_truncates_even_read_only(mounted):
    """Linux truncates on O_RDONLY|O_TRUNC too; with atomic_o_trunc the kernel leaves it to open."""
    p = mounted.mnt / "f"
    p.write_bytes(b"data" * 1000)
    fd = os.open(p, os.O_RDONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0 and os.read(fd, 10) == b""
    finally:
        os.close(fd)
    assert p.stat().st_size == 0
