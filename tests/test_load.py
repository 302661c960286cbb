"""Resources under load, in-process: the dirty limit is one exact global bound, a full
disk makes compaction back off (and resume when there is room), a flush error at unmount says
what was lost and leaves the store consistent, a failed close does not leave its file pinned, and
opening a file decodes ahead only the siblings its opener could read."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import tracemalloc

import pytest
from llmfs.cache import DecodeCache, Readahead
from llmfs.codec import Registry

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.compactor import Compactor
from llmfs.mount import finish
from llmfs.store import ROOT_INO, Store, StoreFull, StoreIOError

from .fake_model import SlowZlibModel, compact_all


def make_fs(tmp_path, bs: int, dirty_limit: int, **kw) -> ns.Filesystem:
    Store.create(str(tmp_path / "s"), bs)
    return ns.Filesystem(Store(str(tmp_path / "s")), Registry(), dirty_limit=dirty_limit, **kw)


def accounted(fs) -> int:
    return sum(len(f.dirty) for f in list(fs._files.values())) * fs.block_size


class DiskFull:
    """Make the store's write transactions fail as on a full disk while `full` is set."""

    def __init__(self, store: Store):
        self.store, self.full, self.attempts = store, False, 0
        self._write = store.write
        store.write = self.write

    @contextlib.contextmanager
    def write(self):
        if self.full:
            self.attempts += 1
            raise StoreFull("no space left on the store's disk (test)")
        with self._write() as t:
            yield t


# ---------------------------------------------------------------- the dirty limit
def test_dirty_limit_bounds_200_open_files_each_written_once(tmp_path):
    """Overhead stated: a write may pass the limit by its own size rounded up to blocks plus one
    block; the Python heap by those blocks' copies while one file is flushed (plain + zstd)."""
    bs, limit = 64 << 10, 1 << 20
    fs = make_fs(tmp_path, bs, limit)
    data = [os.urandom(bs) for _ in range(200)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fhs = []
        for i in range(200):
            fh = fs.create(ROOT_INO, b"f%03d" % i, 0o644, os.O_RDWR, 0, 0)
            fs.write(fh, data[i], 0)  # one block each, all files stay open
            fhs.append(fh)
            assert fs.buffer.dirty_bytes == accounted(fs)
            assert fs.buffer.dirty_bytes <= limit + 2 * bs
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # 200 blocks = 12.5 MiB if each file kept its block
    assert peak < limit + 4 * bs + (2 << 20), peak
    for i, fh in enumerate(fhs):
        assert fs.read(fh, bs, 0) == data[i]
        fs.release(fh)
    assert fs.buffer.dirty_bytes == 0 and not fs.buffer.dirty_files()
    fs.store.close()


def test_dirty_accounting_is_exact_with_concurrent_writers(tmp_path):
    bs = 4096
    fs = make_fs(tmp_path, bs, 16 * bs)
    errors = []

    def writer(k: int) -> None:
        try:
            fh = fs.create(ROOT_INO, b"w%d" % k, 0o644, os.O_RDWR, 0, 0)
            for j in range(60):
                fs.write(fh, bytes([k + 1]) * 3000, (j * 7919) % (20 * bs))
                if j % 17 == 0:
                    fs.truncate(fs.handle_ino(fh), (j * 311) % (10 * bs))
            fs.release(fh)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert fs.buffer.dirty_bytes == 0 == accounted(fs)
    assert fsck.run_checks(fs.store)[0] == []
    fs.store.close()


# ---------------------------------------------------------------- flush errors at close and unmount
def test_failed_close_does_not_pin_the_file_and_keeps_its_data(tmp_path):
    fs = make_fs(tmp_path, 4096, 1 << 20)
    disk = DiskFull(fs.store)
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    ino = fs.handle_ino(fh)
    fs.write(fh, b"precious" * 1000, 0)
    disk.full = True
    with pytest.raises(ns.NoSpace):
        fs.release(fh)
    f = fs._files[ino]
    assert f.users == 0 and f.dirty  # no user, data still buffered
    disk.full = False
    assert fs.flush_all() == []  # stored now, and forgotten
    assert ino not in fs._files
    assert fs.read_ino(ino, 8000, 0) == b"precious" * 1000
    fs.store.close()


def test_unmount_with_a_flush_error_says_what_was_lost_and_marks_the_store(tmp_path, capsys):
    fs = make_fs(tmp_path, 4096, 1 << 20)
    fs.store.set_clean(False)  # as mounted
    fhs = {}
    for name in (b"a", b"b", b"c"):
        fhs[name] = fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
        fs.write(fhs[name], name * 10000, 0)
    bad = fs.handle_ino(fhs[b"b"])
    flush = fs.buffer.flush

    def failing(f):
        if f.ino == bad:
            raise ns.NoSpace("no space left on the store's disk (test)")
        flush(f)

    fs.buffer.flush = failing
    assert finish(fs) == 1
    err = capsys.readouterr().err
    assert "/b: 12288 buffered bytes" in err and "lost" in err, err
    assert fs.store.was_clean()  # every flush is a transaction: consistent
    assert fs.read_ino(fs.handle_ino(fhs[b"a"]), 10, 0) == b"a" * 10
    assert fs.read_ino(fs.handle_ino(fhs[b"c"]), 10, 0) == b"c" * 10
    assert fsck.run_checks(fs.store)[0] == []
    fs.store.close()


def test_unmount_whose_sync_fails_leaves_the_store_marked_unclean(tmp_path, capsys):
    fs = make_fs(tmp_path, 4096, 1 << 20)
    fs.store.set_clean(False)
    fh = fs.create(ROOT_INO, b"a", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, b"x" * 100, 0)

    def sync():
        raise StoreIOError("the store could not be synced: Input/output error (test)")

    fs.store.sync = sync
    assert finish(fs) == 1
    assert "could not be synced" in capsys.readouterr().err
    assert not fs.store.was_clean()  # the next mount checks it
    fs.store.close()


# ---------------------------------------------------------------- compaction on a full disk
def _compaction_env(tmp_path):
    fs = make_fs(tmp_path, 4096, 1 << 20)
    for i in range(4):
        fh = fs.create(ROOT_INO, b"t%d" % i, 0o644, os.O_RDWR, 0, 0)
        fs.write(fh, (b"the quick brown fox %d jumps over the lazy dog\n" % i) * 90, 0)
        fs.release(fh)
    model = SlowZlibModel()
    encodes = []
    encode = model.encode
    model.encode = lambda data: encodes.append(1) or encode(data)
    compactor = Compactor(fs.store, fs.registry, lambda: model, "fake-zlib", compact_after=0)
    disk = DiskFull(fs.store)
    free = [1 << 20]
    fs.store.disk_free = lambda: free[0]
    return fs, compactor, disk, encodes, free


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_compaction_backs_off_on_a_full_disk_without_reencoding(tmp_path):
    fs, compactor, disk, encodes, free = _compaction_env(tmp_path)
    compactor.retry_first, compactor.retry_max, compactor.room_poll = 0.05, 0.2, 0.02
    n = len(compactor.candidates(0))
    disk.full = True
    compactor.run_in_background()
    try:
        time.sleep(1.0)
        # doubling from 0.05 s to 0.2 s: about 7 tries in a second (a tight loop made thousands)
        assert 1 <= disk.attempts <= 10, disk.attempts
        assert len(encodes) == n  # the model ran once per block, not per try
        disk.full = False  # room again: the kept batch is stored
        assert _wait(lambda: not compactor.candidates(0), 5)
        assert len(encodes) == n
    finally:
        compactor.stop()
    assert fsck.run_checks(fs.store)[0] == []
    fs.store.close()


def test_compaction_resumes_as_soon_as_the_disk_has_room(tmp_path):
    fs, compactor, disk, encodes, free = _compaction_env(tmp_path)
    compactor.retry_first = compactor.retry_max = 60.0  # a long wait ...
    compactor.room_poll = 0.02
    disk.full = True
    compactor.run_in_background()
    try:
        assert _wait(lambda: disk.attempts == 1, 5)
        disk.full = False
        free[0] += 64 << 20  # ... cut short when space returns
        assert _wait(lambda: not compactor.candidates(0), 5)
        assert disk.attempts == 1
    finally:
        compactor.stop()
    fs.store.close()


# ---------------------------------------------------------------- prefetch and permissions
def test_opening_a_file_prefetches_only_siblings_the_opener_may_read(tmp_path):
    bs = 4096
    fs = make_fs(tmp_path, bs, 1 << 20, cache=DecodeCache(1 << 20), readahead=Readahead())
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    files = {  # name: (mode, uid, gid)
        b"a": (0o644, 1000, 1000),
        b"b": (0o644, 1000, 1000),
        b"c_private": (0o600, 1000, 1000),
        b"d_public": (0o644, 1000, 1000),
        b"e_group": (0o640, 1000, 50),
        b"f_suppl": (0o640, 1000, 60),
        b"g_mine_no_r": (0o044, 2000, 50),
        b"h_other_grp": (0o604, 3000, 50),
    }
    inos = {}
    for name, (mode, uid, gid) in files.items():
        fh = fs.create(d, name, mode, os.O_RDWR, uid, gid)
        fs.write(fh, name * (300 // len(name) + 1) * 10, 0)
        inos[name] = fs.handle_ino(fh)
        fs.release(fh)
    compact_all(fs.store, fs.registry, SlowZlibModel())
    asked = []
    fs.prefetch.cache.prefetch = lambda hashes, decode: asked.extend(hashes)

    def blocks(name):
        with fs.store.read() as t:
            return set(t.block_hashes(inos[name], 0, 100).values())

    for name in (b"a", b"b"):  # a directory walk: the siblings after b are named on opening b
        fs.release(fs.open(fs.lookup(d, name), os.O_RDONLY, 2000, 50, (60,)))
    got = set(asked)
    assert blocks(b"d_public") <= got and blocks(b"e_group") <= got and blocks(b"f_suppl") <= got
    for name in (b"c_private", b"g_mine_no_r", b"h_other_grp"):
        assert not blocks(name) & got, name
    # credentials unknown: only what everybody may read
    asked.clear()
    fs.prefetch.readahead = Readahead()
    for name in (b"a", b"b"):
        fs.release(fs.open(fs.lookup(d, name), os.O_RDONLY))
    got = set(asked)
    assert blocks(b"d_public") <= got and not blocks(b"e_group") & got
    fs.store.close()
