"""The namespace in-process (no kernel): POSIX semantics, block handling, and the store's
invariants after each kind of operation."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from llmfs.cache import DecodeCache, Readahead

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.store import ROOT_INO, Store, blockmap_key

BS = 4096


@pytest.fixture
def fs(new_fs):
    f = new_fs(BS, cache=DecodeCache(1 << 20), dirty_limit=8 * BS, readahead=Readahead())
    yield f
    f.flush_all()
    problems, _ = fsck.run_checks(f.store)
    assert not problems, [p.message for p in problems]


def new_file(fs, name=b"f", data=b""):
    fh = fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
    if data:
        fs.write(fh, data, 0)
    return fh


def test_write_read_across_blocks_and_holes(fs):
    fh = new_file(fs)
    fs.write(fh, b"a" * 10, 0)
    fs.write(fh, b"b" * (BS + 10), BS - 5)
    fs.write(fh, b"end", 10 * BS)  # leaves a hole
    want = bytearray(10 * BS + 3)
    want[0:10] = b"a" * 10
    want[BS - 5 : 2 * BS + 5] = b"b" * (BS + 10)
    want[10 * BS :] = b"end"
    assert fs.read(fh, len(want) + 100, 0) == bytes(want)
    fs.flush(fh)
    assert fs.read(fh, len(want), 0) == bytes(want)
    assert fs.read(fh, 7, BS - 8) == bytes(want[BS - 8 : BS - 1])
    fs.release(fh)
    ino = fs.lookup(ROOT_INO, b"f")
    with fs.store.read() as t:
        assert sorted(t.block_hashes(ino, 0, 100)) == [0, 1, 2, 10]  # holes are not stored


def test_identical_blocks_are_stored_once(fs):
    block = os.urandom(BS)
    new_file(fs, b"a", block * 3)
    fh = new_file(fs, b"b", block)
    fs.flush_all()
    with fs.store.read() as t:
        refs = dict(t.refs())
    assert list(refs.values()) == [4]
    fs.release(fh)


def test_truncate_down_then_up_reads_zeros(fs):
    fh = new_file(fs, data=b"x" * (3 * BS))
    fs.flush(fh)
    ino = fs.handle_ino(fh)
    fs.truncate(ino, BS + 1)
    fs.truncate(ino, 3 * BS)
    assert fs.read(fh, 3 * BS, 0) == b"x" * (BS + 1) + bytes(2 * BS - 1)
    fs.release(fh)


def test_unlinked_open_file_lives_until_last_close(fs):
    fh = new_file(fs, data=b"still here")
    ino = fs.handle_ino(fh)
    fs.unlink(ROOT_INO, b"f")
    with pytest.raises(ns.NotFound):
        fs.lookup(ROOT_INO, b"f")
    assert fs.read(fh, 100, 0) == b"still here"
    fs.write(fh, b"more", 10)
    assert fs.read(fh, 100, 0) == b"still heremore"
    with fs.store.read() as t:
        assert t.orphans() == [ino]
    fs.release(fh)
    with fs.store.read() as t:
        assert t.inode(ino) is None and t.orphans() == [] and not list(t.refs())


def test_open_flags(fs):
    fh = new_file(fs, data=b"hello")
    fs.release(fh)
    ino = fs.lookup(ROOT_INO, b"f")
    with pytest.raises(ns.Exists):
        fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0, 0)
    fh = fs.open(ino, os.O_WRONLY | os.O_APPEND)
    fs.write(fh, b" world", 0)  # O_APPEND ignores the offset
    fs.release(fh)
    assert fs.read_ino(ino, 100, 0) == b"hello world"
    fh = fs.open(ino, os.O_RDWR | os.O_TRUNC)
    assert fs.getattr(ino).size == 0
    fs.release(fh)


def test_rename_semantics(fs):
    a = fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    b = fs.mkdir(ROOT_INO, b"b", 0o755, 0, 0)
    fs.release(fs.create(a, b"x", 0o644, os.O_RDWR, 0, 0))
    fs.release(fs.create(b, b"y", 0o644, os.O_RDWR, 0, 0))
    fs.mkdir(a, b"sub", 0o755, 0, 0)
    with pytest.raises(ns.NotEmpty):
        fs.rename(ROOT_INO, b"a", ROOT_INO, b"b")  # b is not empty
    with pytest.raises(ns.InvalidArgument):
        fs.rename(ROOT_INO, b"a", a, b"inside")  # into itself
    with pytest.raises(ns.Exists):
        fs.rename(a, b"x", b, b"y", ns.RENAME_NOREPLACE)
    fs.rename(a, b"x", b, b"y", ns.RENAME_EXCHANGE)
    fs.rename(a, b"x", b, b"y")  # replaces b/y
    assert [n for n, _, _ in fs.readdir(a)][2:] == [b"sub"]
    fs.rename(a, b"sub", b, b"sub")  # a directory moves: link counts of both parents change
    assert fs.getattr(a).nlink == 2 and fs.getattr(b).nlink == 3
    fs.rmdir(b, b"sub")
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"c")
    assert fs.getattr(ROOT_INO).nlink == 4


def test_hard_links_symlinks_and_nodes(fs):
    fs.release(new_file(fs, b"f", b"data"))
    ino = fs.lookup(ROOT_INO, b"f")
    fs.link(ino, ROOT_INO, b"g")
    assert fs.getattr(ino).nlink == 2
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    with pytest.raises(ns.NotPermitted):
        fs.link(d, ROOT_INO, b"dlink")
    fs.unlink(ROOT_INO, b"f")
    assert fs.read_ino(fs.lookup(ROOT_INO, b"g"), 10, 0) == b"data"
    s = fs.symlink(ROOT_INO, b"s", b"../some/where", 0, 0)
    assert fs.readlink(s) == b"../some/where" and fs.getattr(s).size == 13
    fifo = fs.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o600, 0, 0, 0)
    assert stat.S_ISFIFO(fs.getattr(fifo).mode)
    with pytest.raises(ns.IsADirectory):
        fs.unlink(ROOT_INO, b"d")
    with pytest.raises(ns.NotADirectory):
        fs.rmdir(ROOT_INO, b"g")
    with pytest.raises(ns.NameTooLong):
        fs.mkdir(ROOT_INO, b"n" * 256, 0o755, 0, 0)


def test_xattrs_and_attributes(fs):
    fs.release(new_file(fs))
    ino = fs.lookup(ROOT_INO, b"f")
    fs.setxattr(ino, b"user.a", b"1")
    with pytest.raises(ns.Exists):
        fs.setxattr(ino, b"user.a", b"2", ns.XATTR_CREATE)
    with pytest.raises(ns.NoAttribute):
        fs.setxattr(ino, b"user.b", b"2", ns.XATTR_REPLACE)
    with pytest.raises(ns.NotSupported):
        fs.setxattr(ino, b"system.posix_acl_access", b"")
    assert fs.listxattr(ino) == [b"user.a"] and fs.getxattr(ino, b"user.a") == b"1"
    fs.removexattr(ino, b"user.a")
    with pytest.raises(ns.NoAttribute):
        fs.getxattr(ino, b"user.a")
    fs.chmod(ino, 0o4755)
    fs.chown(ino, 1000, 1000)
    inode = fs.getattr(ino)
    assert (inode.uid, inode.gid) == (1000, 1000)
    assert inode.mode & 0o7777 == 0o755  # chown cleared set-uid
    fs.utimens(ino, 1, 2_000_000_123)
    assert (fs.getattr(ino).atime, fs.getattr(ino).mtime) == (1, 2_000_000_123)


def test_setgid_directory_passes_its_group(fs):
    d = fs.mkdir(ROOT_INO, b"d", 0o2775, 0, 50)
    sub = fs.mkdir(d, b"sub", 0o755, 0, 0)
    assert fs.getattr(sub).gid == 50 and fs.getattr(sub).mode & stat.S_ISGID


def test_dirty_limit_flushes_and_counters_stay_exact(fs):
    fh = new_file(fs)
    for i in range(40):  # 40 blocks > the 8-block dirty limit
        fs.write(fh, os.urandom(BS), i * BS)
    assert fs.buffer.dirty_bytes <= 9 * BS
    fs.release(fh)
    fs.unlink(ROOT_INO, b"f")
    with fs.store.read() as t:
        assert t.counters.logical == 0 and t.counters.stored == 0


def test_concurrent_writers_and_readers(fs):
    fhs = [new_file(fs, b"f%d" % i) for i in range(4)]
    shared = new_file(fs, b"shared")
    errors = []

    def worker(i):
        try:
            for j in range(50):
                data = bytes([i]) * 1000
                fs.write(fhs[i], data, j * 1000)
                fs.write(shared, data, (j * 4 + i) * 1000)
                assert fs.read(fhs[i], 1000, j * 1000) == data
                if j % 10 == 0:
                    fs.flush(fhs[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for j in range(50):
        for i in range(4):
            assert fs.read(shared, 1000, (j * 4 + i) * 1000) == bytes([i]) * 1000
    for fh in fhs + [shared]:
        fs.release(fh)


def test_models_table_reads_keys_written_before_container_format_2(tmp_path):
    """Stores made before container format 2 keyed `models` by a 16-byte fingerprint; containers
    now name models by its first 8 bytes, which must still find the spec."""
    Store.create(str(tmp_path / "s"), BS)
    store = Store(str(tmp_path / "s"))
    old, new = bytes(range(16)), bytes(range(100, 108))
    with store.write() as t:
        t.add_model(old, "old-model")
        t.add_model(new, "new-model")
    with store.read() as t:
        assert t.model_spec(old[:8]) == "old-model" and t.model_spec(new) == "new-model"
        assert t.model_spec(bytes(8)) is None and t.model_spec(old[:7] + b"\xff") is None
        assert t.models() == {old[:8]: "old-model", new: "new-model"}
    store.close()


def test_close_leaves_the_data_to_release_in_group_mode(new_fs, monkeypatch):
    """FLUSH (every close) stores nothing while changes join a group committed later: the release
    that follows the last close stores the file in one transaction. Without a group, or with the
    disk nearly full, the close itself stores it, so that it can report ENOSPC."""
    fs = new_fs(BS)

    def stored(ino: int) -> list[int]:
        with fs.store.read() as t:
            return sorted(t.block_hashes(ino, 0, 10))

    fh = new_file(fs, b"plain", b"x" * 100)
    ino = fs.handle_ino(fh)
    fs.flush(fh)  # no group: every change commits at once
    assert stored(ino) == [0]
    fs.release(fh)
    fs.store.start_group_commit(interval=60)
    fh = new_file(fs, b"grouped", b"y" * 100)
    ino = fs.handle_ino(fh)
    fs.flush(fh)
    assert stored(ino) == [] and fs.getattr(ino).size == 100
    fh2 = fs.open(ino, os.O_RDONLY)  # a reader meanwhile sees the buffered data
    assert fs.read(fh2, 200, 0) == b"y" * 100
    fs.release(fh2)
    fs.release(fh)
    assert stored(ino) == [0]
    # an fsync (or fsyncdir) that comes before the release of a file closed earlier stores it
    fh = new_file(fs, b"synced", b"s" * 100)
    ino = fs.handle_ino(fh)
    fs.flush(fh)
    assert stored(ino) == []
    fs.sync()
    with fs.store.env.begin() as txn:  # what a crash would leave
        assert txn.get(blockmap_key(ino, 0), db=fs.store.db["blockmap"]) is not None
    fs.release(fh)
    assert fs._closed == {}
    monkeypatch.setattr(fs.store, "commits_later", lambda: False)  # as with low disk space
    fh = new_file(fs, b"low", b"z" * 100)
    ino = fs.handle_ino(fh)
    fs.flush(fh)
    assert stored(ino) == [0]
    fs.release(fh)
    fs.store.stop_group_commit()


def test_commits_later_only_in_an_unpaused_group(tmp_path, monkeypatch):
    from llmfs import store as store_mod

    Store.create(str(tmp_path / "s"), BS)
    s = Store(str(tmp_path / "s"))
    try:
        assert not s.commits_later()
        s.start_group_commit(interval=60)
        assert s.commits_later()
        monkeypatch.setattr(store_mod, "SPACE_CHECK", 0.0)
        monkeypatch.setattr(s, "disk_free", lambda: 0)  # the next look pauses the group
        assert not s.commits_later()
    finally:
        s.close()


def test_open_with_o_trunc_clears_setid_bits_unless_privileged(fs):
    """The kernel leaves open(O_TRUNC)'s truncation to the filesystem (atomic_o_trunc) and with
    it the set-ID clearing that a truncate does: setuid, and setgid of a group-executable file."""
    fh = new_file(fs, b"f", b"data")
    ino = fs.handle_ino(fh)
    fs.release(fh)
    for mode, privileged, want in (
        (0o6755, True, 0o6755),
        (0o6755, False, 0o0755),
        (0o2755, False, 0o0755),
        (0o2765, False, 0o2765),  # setgid without group execute: mandatory locking, kept
        (0o4600, lambda: False, 0o0600),
    ):
        fs.chmod(ino, mode)
        fh = fs.open(ino, os.O_WRONLY | os.O_TRUNC, 0, 0, may_keep_setid=privileged)
        fs.release(fh)
        assert stat.S_IMODE(fs.getattr(ino).mode) == want, (oct(mode), privileged)
    fs.chmod(ino, 0o6755)
    fh = fs.open(ino, os.O_WRONLY, 0, 0, may_keep_setid=False)  # no O_TRUNC: nothing to clear
    fs.release(fh)
    assert stat.S_IMODE(fs.getattr(ino).mode) == 0o6755
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_WRONLY | os.O_TRUNC, 0, 0, may_keep_setid=False)
    fs.release(fh)  # create of an existing name without O_EXCL opens it
    assert stat.S_IMODE(fs.getattr(ino).mode) == 0o0755


def test_getxattr_by_path_in_one_snapshot(fs):
    fh = new_file(fs, b"f", b"data")
    ino = fs.handle_ino(fh)
    fs.setxattr(ino, b"user.a", b"1")
    assert fs.getxattr_path(b"/f", b"user.a") == b"1"
    with pytest.raises(ns.NoAttribute):
        fs.getxattr_path(b"/f", b"security.capability")
    with pytest.raises(ns.NotFound):
        fs.getxattr_path(b"/nope", b"user.a")
    assert fs.getxattr_path(b"/f", b"user.llmfs.codec") == fs.getxattr(ino, b"user.llmfs.codec")
    fs.release(fh)
