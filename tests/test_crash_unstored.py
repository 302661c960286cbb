"""A crash between a file's create and its data (store.py: the unstored table): a group commit
can land after CREATE and before the data is stored at RELEASE; the next mount must find such a
file absent or whole, never created-but-empty — while files that are legitimately empty (closed
empty, fsync'ed, named by an fsyncdir) survive.

The session runs in a child process that ends with os._exit, as kill -9 would end the daemon: its
open group transaction is never committed. The commit that lands "between" is forced with
Store.sync(), the same commit of the group that a timed one is, so nothing waits on a clock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from llmfs import fsck
from llmfs.mount import open_filesystem
from llmfs.store import ROOT_INO, Store

SESSION = textwrap.dedent("""
    import os, sys
    from llmfs.codec import Registry
    from llmfs.namespace import Filesystem
    from llmfs.store import ROOT_INO, Store

    store = Store(sys.argv[1])
    store.set_clean(False)
    store.start_group_commit(interval=3600, drain=0)
    fs = Filesystem(store, Registry())
    W = os.O_WRONLY | os.O_CREAT

    def new(name, parent=ROOT_INO):
        return fs.create(parent, name, 0o644, W, 0, 0)

    fa = new(b"a")                                  # data after the commit: absent
    fe = new(b"e")                                  # linked and renamed, data after: absent
    ino_e = fs.handle_ino(fe)
    fs.link(ino_e, ROOT_INO, b"e2")
    fs.rename(ROOT_INO, b"e", ROOT_INO, b"e3")
    fg = new(b"g")                                  # re-opened with O_TRUNC while new: absent
    fg2 = fs.open(fs.handle_ino(fg), os.O_WRONLY | os.O_TRUNC, 0, 0)
    fb = new(b"b")                                  # whole before the commit: whole
    fs.write(fb, b"B" * 100, 0)
    fs.release(fb)
    fc = new(b"c")                                  # touch: closed empty: kept, empty
    fs.release(fc)
    fd = new(b"d")                                  # fsync'ed empty, still open: kept
    fs.fsync(fd)
    sub = fs.mkdir(ROOT_INO, b"sub", 0o755, 0, 0)
    ff = new(b"f", sub)                             # named by an fsyncdir, still open: kept
    fs.fsyncdir(sub)
    fh = new(b"h")                                  # ftruncate'd to a size (data): kept
    fs.truncate(fs.handle_ino(fh), 5000, fh)
    store.sync()                                    # the commit that lands in between
    fs.write(fa, b"A" * 100, 0)
    fs.release(fa)
    fs.write(fe, b"E" * 100, 0)
    fs.release(fe)
    fs.write(fg2, b"G" * 100, 0)
    fs.release(fg2)
    fs.release(fg)
    print("ok", flush=True)
    os._exit(0)                                     # kill -9: the open group is lost
""")


def names(fs, parent=ROOT_INO) -> dict[bytes, int]:
    return {n: i for n, i, _ in fs.readdir(parent)[2:]}


def read_all(fs, ino) -> bytes:
    return fs.read_ino(ino, 1 << 20, 0)


@pytest.fixture
def crashed(tmp_path):
    path = str(tmp_path / "s")
    Store.create(path, 4096)
    res = subprocess.run([sys.executable, "-c", SESSION, path], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "ok", res.stderr
    return path


def test_the_crash_left_marked_files_behind(crashed):
    """Without recovery the store holds the new files empty and marked, and fsck says so."""
    store = Store(crashed)
    try:
        assert not store.was_clean()
        with store.read() as t:
            assert len(t.unstored()) == 3  # a, e, g: h was stored, c closed, d and f promised
            for ino in t.unstored():
                assert t.inode(ino).size == 0
        problems, _ = fsck.run_checks(store, fsck.QUICK_CHECKS)
        assert sorted(p.check for p in problems) == ["unstored"] * 3
        assert any("/e2" in p.message and "/e3" in p.message for p in problems)
    finally:
        store.close()


def test_the_next_mount_finds_each_new_file_absent_or_whole(crashed):
    fs, _ = open_filesystem(crashed, cache_size=1 << 20)
    try:
        root = names(fs)
        for gone in (b"a", b"e", b"e2", b"e3", b"g"):
            assert gone not in root, f"{gone!r} came back created-but-empty"
        assert read_all(fs, root[b"b"]) == b"B" * 100
        for empty in (b"c", b"d"):
            assert fs.getattr(root[empty]).size == 0  # closed empty or fsync'ed: what the user made
        assert fs.getattr(names(fs, root[b"sub"])[b"f"]).size == 0  # named by an fsyncdir
        assert read_all(fs, root[b"h"]) == bytes(5000)
        with fs.store.read() as t:
            assert t.unstored() == []
        problems, _ = fsck.run_checks(fs.store, fsck.QUICK_CHECKS)
        assert problems == []
    finally:
        fs.store.close()


def test_a_clean_unmount_leaves_no_mark(new_fs):
    from llmfs.mount import finish

    fs = new_fs(4096)
    fs.store.set_clean(False)
    fs.store.start_group_commit(interval=3600)
    fh = fs.create(ROOT_INO, b"open", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    with fs.store.read() as t:
        assert t.unstored() == [fs.handle_ino(fh)]
    assert finish(fs) == 0  # unmounted with the file still open: it is what the user has
    with fs.store.read() as t:
        assert t.unstored() == []
    assert fs.store.was_clean()


def test_marks_end_with_the_first_store_of_data_or_the_release(new_fs):
    fs = new_fs(4096)
    fs.store.start_group_commit(interval=3600)

    def marked() -> list[int]:
        with fs.store.read() as t:
            return t.unstored()

    fh = fs.create(ROOT_INO, b"x", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    ino = fs.handle_ino(fh)
    fs.write(fh, b"x" * 10, 0)
    assert marked() == [ino]  # buffered, not stored
    fs.fsync(fh)
    assert marked() == []
    fs.release(fh)
    fh = fs.create(ROOT_INO, b"y", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    ino = fs.handle_ino(fh)
    fs.unlink(ROOT_INO, b"y")  # open and unlinked: an orphan, deleted at its release
    assert marked() == [ino]
    fs.release(fh)
    assert marked() == []
    with fs.store.read() as t:
        assert t.inode(ino) is None


def test_a_store_made_before_the_table_gets_it_when_opened_for_writing(tmp_path):
    import lmdb

    path = str(tmp_path / "s")
    Store.create(path, 4096)
    env = lmdb.open(path, max_dbs=20)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"unstored", txn=txn), delete=True)
    env.close()
    ro = Store(path, lock=False, readonly=True)
    try:
        with ro.read() as t:
            assert t.unstored() == []  # read as empty
    finally:
        ro.close()
    s = Store(path)
    try:
        with s.write() as t:
            t.add_unstored(5)
        with s.read() as t:
            assert t.unstored() == [5]
    finally:
        s.close()
