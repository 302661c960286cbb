"""The store's group commit (llmfs/store.py, GROUP COMMIT): changes are visible at once, durable
after sync() or the commit interval, a failed operation rolls back alone, and a commit waits
briefly for files open for writing."""

from __future__ import annotations

import threading
import time

import pytest

from llmfs.store import Inode, Store, ino_key


@pytest.fixture
def store(tmp_path):
    Store.create(str(tmp_path / "s"), 65536)
    s = Store(str(tmp_path / "s"))
    yield s
    s.close()


def committed(store: Store, ino: int) -> bool:
    """Whether a plain LMDB read transaction (what a crash would leave) sees inode ino."""
    with store.env.begin() as txn:
        return txn.get(ino_key(ino), db=store.db["inodes"]) is not None


def put(store: Store, ino: int) -> None:
    with store.write() as t:
        t.put_inode(ino, Inode(0o100644, 0, 0, 1, 0, 1, 1, 1))


def test_sync_commits_the_group_and_reads_see_it_before(store):
    store.start_group_commit(interval=60)
    put(store, 100)
    with store.read() as t:
        assert t.inode(100) is not None
    assert not committed(store, 100)
    store.sync()
    assert committed(store, 100)
    store.sync()  # nothing new: returns at once


def test_the_interval_bounds_what_is_uncommitted(store):
    store.start_group_commit(interval=0.2)
    put(store, 101)
    deadline = time.monotonic() + 10
    while not committed(store, 101):
        assert time.monotonic() < deadline, "the group was never committed"
        time.sleep(0.05)


def test_a_failed_operation_rolls_back_alone(store):
    store.start_group_commit(interval=60)
    put(store, 102)
    with pytest.raises(RuntimeError):
        with store.write() as t:
            t.put_inode(103, Inode(0o100644, 0, 0, 1, 0, 1, 1, 1))
            raise RuntimeError("midway")
    with store.read() as t:
        assert t.inode(102) is not None and t.inode(103) is None
    store.stop_group_commit()
    assert committed(store, 102) and not committed(store, 103)


def test_a_timed_commit_waits_briefly_for_holds(store):
    store.start_group_commit(interval=0.05, drain=5)
    store.hold()
    put(store, 104)
    time.sleep(0.5)
    assert not committed(store, 104), "committed while a file was open for writing"
    threading.Timer(0.2, store.unhold).start()
    deadline = time.monotonic() + 10
    while not committed(store, 104):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_concurrent_syncs_share_commits(store):
    store.start_group_commit(interval=60)
    errors = []

    def worker(k):
        try:
            for i in range(20):
                put(store, 1000 + 100 * k + i)
                store.sync()
                assert committed(store, 1000 + 100 * k + i)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
