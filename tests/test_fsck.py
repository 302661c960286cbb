"""Each fsck check: corrupt one thing, the check named after it finds it, --repair fixes what can
be fixed, and then a full check comes back clean."""

from __future__ import annotations

import os

import pytest
from llmfs.codec import Registry

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.store import ROOT_INO, blockmap_key, dirent_key

BS = 4096


@pytest.fixture
def store(new_fs):
    fs = new_fs(BS)
    s = fs.store
    d = fs.mkdir(ROOT_INO, b"dir", 0o755, 0, 0)
    for name, data in ((b"a", b"text " * 3000), (b"b", os.urandom(3 * BS))):
        fh = fs.create(d, name, 0o644, os.O_RDWR, 0, 0)
        fs.write(fh, data, 0)
        fs.release(fh)
    assert fsck.run_checks(s)[0] == []
    return s


def _first(t, db):
    with t.txn.cursor(db=t.db[db]) as cur:
        cur.first()
        return bytes(cur.key()), bytes(cur.value())


def corrupt_refcount(t):
    h, _ = _first(t, "refs")
    t.txn.put(h, (7).to_bytes(8, "big"), db=t.db["refs"])


def corrupt_dirent(t):
    t.link(ROOT_INO, b"ghost", 999)


def corrupt_link_count(t):
    ino = t.lookup(t.lookup(ROOT_INO, b"dir"), b"a")
    i = t.inode(ino)
    t.put_inode(ino, i.evolve(nlink=5), i)


def corrupt_blockmap(t):
    ino = t.lookup(t.lookup(ROOT_INO, b"dir"), b"b")
    t.txn.put(blockmap_key(ino, 1), b"\x01" * 32, db=t.db["blockmap"])


def corrupt_orphan(t):
    t.add_orphan(t.lookup(t.lookup(ROOT_INO, b"dir"), b"a"))
    ino = t.lookup(t.lookup(ROOT_INO, b"dir"), b"a")
    t.unlink(t.lookup(ROOT_INO, b"dir"), b"a")
    i = t.inode(ino)
    t.put_inode(ino, i.evolve(nlink=0), i)


def corrupt_counters(t):
    t.counters.logical += 12345


def corrupt_pending(t):
    t.txn.put(b"\x02" * 32, (1).to_bytes(8, "big"), db=t.db["pending"])


def corrupt_unnamed_inode(t):
    t.txn.delete(dirent_key(t.lookup(ROOT_INO, b"dir"), b"b"), db=t.db["dirents"])


@pytest.mark.parametrize(
    "corrupt, check",
    [
        (corrupt_refcount, "refcounts"),
        (corrupt_dirent, "dirents"),
        (corrupt_link_count, "link_counts"),
        (corrupt_blockmap, "blockmap"),
        (corrupt_orphan, "orphans"),
        (corrupt_counters, "counters"),
        (corrupt_pending, "pending"),
        (corrupt_unnamed_inode, "link_counts"),
    ],
)
def test_check_finds_and_repairs(store, corrupt, check):
    with store.write() as t:
        corrupt(t)
    problems, repairable = fsck.run_checks(store)
    assert check in {p.check for p in problems}
    assert repairable
    fsck.run_checks(store, repair=True)
    assert fsck.run_checks(store)[0] == []


def test_corrupt_block_is_named_and_quarantined(store):
    """Repair quarantines a corrupt block: the file keeps its size and the block's range reads
    as EIO (never zeros); then the store checks clean; tests/test_damage.py has more."""
    with store.read() as t:
        ino = t.lookup(t.lookup(ROOT_INO, b"dir"), b"b")
        size = t.inode(ino).size
        h = t.block_hashes(ino, 2, 2)[2]
        blob = bytearray(t.container(h))
    blob[-1] ^= 0xFF
    with store.write() as t:
        t.txn.put(h, bytes(blob), db=t.db["blocks"])
    problems, repairable = fsck.run_checks(store)
    assert [p.check for p in problems] == ["block_checksums"]
    assert "/dir/b (block 2)" in problems[0].message and repairable
    fsck.run_checks(store, repair=True)
    assert fsck.run_checks(store)[0] == []
    fs = ns.Filesystem(store, Registry())
    assert fs.getattr(ino).size == size  # the file stays, with its size
    with pytest.raises(ns.CorruptData):
        fs.read_ino(ino, 10, 2 * BS)
