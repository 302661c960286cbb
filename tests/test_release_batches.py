"""Released small files stored in batches (namespace.Filesystem.release, batch_releases): what a
release leaves to the batch is seen by reads, stat and a new open before it is stored; sync stores
it; a full batch, the batch's clock and stop_batches store it; a file unlinked meanwhile leaves
no orphan; a batch that fails as a whole is stored file by file; and a crash before the batch is
stored finds its files absent (their create committed, marked unstored), never empty or torn.
Also the xattr hint of getxattr_path and the FUSE subclass's stat buffer."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import time

import pytest

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.mount import open_filesystem
from llmfs.store import ROOT_INO, Store

BS = 4096
W = os.O_WRONLY | os.O_CREAT


@pytest.fixture
def bfs(new_fs, monkeypatch):
    """A filesystem with the group commit and release batches, as mounted; the batch's clock
    stopped (tests that need it set it)."""
    monkeypatch.setattr(ns, "RELEASE_WAIT", 3600.0)
    fs = new_fs(BS, batch_releases=True)
    fs.store.start_group_commit(interval=3600, drain=0)
    yield fs
    fs.stop_batches()
    fs.flush_all()
    fs.end_session()
    problems, _ = fsck.run_checks(fs.store)
    assert not problems, [p.message for p in problems]
    fs.store.stop_group_commit()


def stored(fs, ino: int) -> tuple[int, list[int]]:
    """(size, block indices) of ino as the store holds it (not the buffered state)."""
    with fs.store.read() as t:
        inode = t.inode(ino)
        return (inode.size if inode else -1), sorted(t.block_hashes(ino, 0, 1 << 20))


def marked(fs) -> list[int]:
    with fs.store.read() as t:
        return t.unstored()


def small(fs, name: bytes, data: bytes) -> int:
    fh = fs.create(ROOT_INO, name, 0o644, W, 0, 0)
    if data:
        fs.write(fh, data, 0)
    fs.flush(fh)
    ino = fs.handle_ino(fh)
    fs.release(fh)
    return ino


def test_a_released_file_waits_in_the_batch_and_is_seen_meanwhile(bfs):
    ino = small(bfs, b"a", b"A" * 100)
    assert stored(bfs, ino) == (0, []) and marked(bfs) == [ino]  # in the batch, not stored
    assert bfs.getattr(ino).size == 100
    assert bfs.read_ino(ino, 200, 0) == b"A" * 100
    fh = bfs.open(ino, os.O_RDWR)  # a new open meanwhile, and a write
    assert bfs.read(fh, 200, 0) == b"A" * 100
    bfs.write(fh, b"B", 100)
    bfs.release(fh)
    assert bfs.read_ino(ino, 200, 0) == b"A" * 100 + b"B"
    bfs.store_released()
    assert stored(bfs, ino) == (101, [0]) and marked(bfs) == []
    assert bfs._released == {} and not bfs.is_open(ino)  # forgotten once stored


def test_sync_stores_the_batch_and_ends_the_marks_of_empty_files(bfs):
    ino = small(bfs, b"data", b"x" * 10)
    empty = small(bfs, b"touched", b"")  # closed empty: what the user made, kept after a crash
    assert sorted(marked(bfs)) == sorted([ino, empty])
    bfs.sync()
    assert stored(bfs, ino) == (10, [0]) and marked(bfs) == []
    with bfs.store.env.begin() as txn:  # committed: what a crash would leave
        assert txn.get(ino.to_bytes(8, "big"), db=bfs.store.db["inodes"]) is not None


def test_a_full_batch_is_stored_by_the_release_that_fills_it(bfs):
    inos = [small(bfs, b"f%03d" % i, b"%d" % i * 50) for i in range(ns.RELEASE_BATCH)]
    assert bfs._released == {}
    for i, ino in enumerate(inos):
        assert stored(bfs, ino) == (len(b"%d" % i * 50), [0])
    assert marked(bfs) == []


def test_the_batch_is_stored_after_its_wait_without_a_sync(bfs, monkeypatch):
    monkeypatch.setattr(ns, "RELEASE_WAIT", 0.05)
    ino = small(bfs, b"late", b"L" * 10)
    deadline = time.monotonic() + 10
    while stored(bfs, ino) != (10, [0]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stored(bfs, ino) == (10, [0])


def test_stop_batches_stores_what_is_left(bfs):
    ino = small(bfs, b"s", b"S" * 10)
    bfs.stop_batches()
    assert stored(bfs, ino) == (10, [0])
    ino2 = small(bfs, b"after", b"T" * 10)  # stopped: a later release stores at once
    assert stored(bfs, ino2) == (10, [0])


def test_a_file_unlinked_while_in_the_batch_leaves_nothing(bfs):
    ino = small(bfs, b"gone", b"G" * 10)
    bfs.unlink(ROOT_INO, b"gone")
    bfs.store_released()
    with bfs.store.read() as t:
        assert t.inode(ino) is None and t.orphans() == [] and t.unstored() == []


def test_only_small_unlinked_free_files_with_work_wait(bfs):
    big = bfs.create(ROOT_INO, b"big", 0o644, W, 0, 0)
    bfs.write(big, b"b" * (3 * BS), 0)
    ino = bfs.handle_ino(big)
    bfs.release(big)
    assert stored(bfs, ino) == (3 * BS, [0, 1, 2])  # more than one dirty block: stored at once
    fh = bfs.open(ino, os.O_RDONLY)
    bfs.release(fh)
    assert bfs._released == {}  # nothing to store
    fh = bfs.create(ROOT_INO, b"orphan", 0o644, W, 0, 0)
    bfs.write(fh, b"o", 0)
    bfs.unlink(ROOT_INO, b"orphan")
    bfs.release(fh)
    assert bfs._released == {}


def test_no_batches_without_a_group(new_fs):
    fs = new_fs(BS, batch_releases=True)
    ino = small(fs, b"a", b"A")
    assert stored(fs, ino) == (1, [0])  # every change commits at once: stored by the release


def test_a_batch_that_fails_whole_is_stored_file_by_file(bfs, monkeypatch):
    inos = [small(bfs, b"g%d" % i, b"g" * (i + 1)) for i in range(3)]
    real = bfs.buffer.flush_many

    def whole_fails(files, settle=frozenset()):
        if len(files) > 1:
            raise ns.NoSpace("the batch does not fit")
        real(files, settle)

    monkeypatch.setattr(bfs.buffer, "flush_many", whole_fails)
    bfs.store_released()
    monkeypatch.undo()
    for i, ino in enumerate(inos):
        assert stored(bfs, ino) == (i + 1, [0])
    assert marked(bfs) == []


def test_a_file_that_cannot_be_stored_keeps_its_data(bfs, monkeypatch):
    ino = small(bfs, b"k", b"K" * 10)
    real = bfs.buffer.flush_many

    def full(files, settle=frozenset()):
        raise ns.NoSpace("full")

    monkeypatch.setattr(bfs.buffer, "flush_many", full)
    bfs.store_released()  # logged, not raised: the release that queued it is long gone
    assert stored(bfs, ino) == (0, []) and bfs.getattr(ino).size == 10 and bfs._files[ino].dirty
    monkeypatch.setattr(bfs.buffer, "flush_many", real)
    assert bfs.flush_all() == []
    assert stored(bfs, ino) == (10, [0])


SESSION = textwrap.dedent("""
    import os, sys
    from llmfs import namespace as ns
    from llmfs.codec import Registry
    from llmfs.store import ROOT_INO, Store

    ns.RELEASE_WAIT = 3600.0
    store = Store(sys.argv[1])
    store.set_clean(False)
    store.start_group_commit(interval=3600, drain=0)
    fs = ns.Filesystem(store, Registry(), batch_releases=True)
    W = os.O_WRONLY | os.O_CREAT

    def small(name, data):
        fh = fs.create(ROOT_INO, name, 0o644, W, 0, 0)
        fs.write(fh, data, 0)
        fs.flush(fh)
        fs.release(fh)

    for i in range(ns.RELEASE_BATCH):               # a full batch, stored: whole
        small(b"b%03d" % i, b"%d" % i * 300)
    for i in range(5):                              # waiting in the batch at the commit: absent
        small(b"w%d" % i, b"W" * 300)
    store.sync()                                    # a group commit, the batch not stored
    print("ok", flush=True)
    os._exit(0)                                     # kill -9: the open group is lost
""")


def test_a_crash_before_the_batch_is_stored_finds_its_files_absent(tmp_path):
    path = str(tmp_path / "s")
    Store.create(path, BS)
    res = subprocess.run([sys.executable, "-c", SESSION, path], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "ok", res.stderr
    fs, _ = open_filesystem(path, cache_size=1 << 20)
    try:
        root = {n: i for n, i, _ in fs.readdir(ROOT_INO)[2:]}
        assert not any(n.startswith(b"w") for n in root), "created-but-empty files came back"
        for i in range(ns.RELEASE_BATCH):
            data = b"%d" % i * 300
            assert fs.read_ino(root[b"b%03d" % i], 1 << 20, 0) == data
        problems, _ = fsck.run_checks(fs.store, fsck.QUICK_CHECKS)
        assert problems == []
    finally:
        fs.store.close()


def test_getxattr_by_path_needs_no_walk_while_no_file_has_an_xattr(new_fs, tmp_path):
    fs = new_fs(BS)
    fh = fs.create(ROOT_INO, b"f", 0o644, W, 0, 0)
    ino = fs.handle_ino(fh)
    calls = []
    fs._walk = lambda *a, **k: calls.append(a) or ns.Filesystem._walk(fs, *a, **k)
    with pytest.raises(ns.NoAttribute):
        fs.getxattr_path(b"/f", b"security.capability")
    with pytest.raises(ns.NameTooLong):
        fs.getxattr_path(b"/" + b"n" * 256, b"user.a")  # too long to exist: still says so
    assert calls == []
    fs.setxattr(ino, b"user.a", b"1")  # from now on every answer walks
    assert fs.getxattr_path(b"/f", b"user.a") == b"1"
    with pytest.raises(ns.NotFound):
        fs.getxattr_path(b"/nope", b"user.a")
    assert calls
    fs.release(fh)
    again = ns.Filesystem(fs.store, fs.registry)  # a store that has an xattr: known at start
    assert again._xattrs_may_exist and again.getxattr_path(b"/f", b"user.a") == b"1"


def test_the_fuse_subclass_fills_stat_as_mfusepy_does():
    import mfusepy

    from llmfs.fuseops import FUSE

    attrs = {
        "st_ino": 7,
        "st_mode": 0o100644,
        "st_nlink": 2,
        "st_uid": 1000,
        "st_gid": 100,
        "st_size": 12345,
        "st_atime": 1_700_000_000_123_456_789,
        "st_mtime": -1,  # before the epoch: tv_sec -1, tv_nsec 999999999
        "st_ctime": 5,
        "st_rdev": 0,
        "st_blocks": 25,
        "st_blksize": 65536,
    }

    class Fake:
        encoding, errors = "utf-8", "surrogateescape"
        _path = FUSE._path

        class operations:
            @staticmethod
            def getattr(path, fh):
                assert (path, fh) == ("/x", None)
                return dict(attrs)

    ours, theirs = mfusepy.c_stat(), mfusepy.c_stat()
    ctypes.memset(ctypes.byref(ours), 0xAB, ctypes.sizeof(ours))  # every byte is written
    assert FUSE.fgetattr(Fake(), b"/x", ctypes.pointer(ours), None) == 0
    mfusepy.set_st_attrs(theirs, attrs, use_ns=True)
    assert bytes(ours) == bytes(theirs)
