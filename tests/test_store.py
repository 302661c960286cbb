"""The block store (llmfs/store.py) on its own: creating and opening stores, the lock, and the tables'
operations keeping the schema's invariants — refcounts equal block-map references, a block lives
exactly as long as something names it, counters equal the sums, write transactions are atomic."""

from __future__ import annotations

import os
import stat
from collections import Counter

import pytest
from llmfs.codec import Registry
from llmfs.codec.registry import RAW, ZSTD

from llmfs.store import (
    FORMAT_VERSION,
    ROOT_INO,
    Inode,
    NotAStore,
    Store,
    StoreError,
    StoreLocked,
    UnsupportedFormat,
    block_hash,
    now_ns,
)

BS = 4096
REG = Registry()


@pytest.fixture
def store(tmp_path):
    Store.create(str(tmp_path / "s"), BS)
    s = Store(str(tmp_path / "s"))
    yield s
    s.close()


def block(data: bytes) -> tuple[bytes, bytes, int]:
    """(hash, container, codec id) of a block, as the write path makes them."""
    blob = REG.encode(data)
    return block_hash(data), blob, REG.header(blob).codec_id


def put(t, ino: int, index: int, data: bytes, pending: bool = False) -> bytes:
    h, blob, cid = block(data)
    t.set_block(ino, index, h, blob, cid, len(data), pending=pending)
    return h


def new_file(t, size: int = 0) -> int:
    ino = t.next_ino()
    now = now_ns()
    t.put_inode(ino, Inode(stat.S_IFREG | 0o644, 0, 0, 1, size, now, now, now))
    return ino


def check_invariants(s: Store) -> None:
    """The schema's block invariants, recomputed from the tables."""
    with s.read() as t:
        named = Counter(h for _, _, h in t.blockmap_entries())
        refs = dict(t.refs())
        blocks = dict(t.blocks())
        assert refs == dict(named)
        assert set(blocks) == set(refs)
        assert {h for h, _ in t.pending()} <= set(blocks)
        per_codec = [[0, 0, 0] for _ in t.counters.per_codec]
        for blob in blocks.values():
            head = REG.header(blob)
            row = per_codec[head.codec_id]
            row[0] += 1
            row[1] += head.length
            row[2] += len(blob)
        assert t.counters.per_codec == per_codec
        logical = sum(i.size for _, i in t.inodes() if i.is_reg)
        assert t.counters.logical == logical


# -- creating and opening ---------------------------------------------------------------------------
def test_a_new_store_has_a_root_directory_and_its_block_size(store):
    assert store.block_size == BS and store.model_spec == "" and store.was_clean()
    with store.read() as t:
        root = t.inode(ROOT_INO)
        assert root.is_dir and root.nlink == 2 and root.uid == os.getuid()
        assert list(t.listdir(ROOT_INO)) == []
        assert t.counters.logical == 0 and t.counters.stored == 0


def test_create_refuses_an_existing_store_and_bad_block_sizes(tmp_path, store):
    with pytest.raises(StoreError, match="already holds a store"):
        Store.create(store.path, BS)
    for bad in (1000, 2048, 3 * 4096, 1 << 25):
        with pytest.raises(StoreError, match="power of two"):
            Store.create(str(tmp_path / f"b{bad}"), bad)


def test_opening_what_is_not_a_store_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStore, match="llmfs mkfs"):
        Store(str(tmp_path / "empty"))
    with pytest.raises(NotAStore):
        Store(str(tmp_path / "missing"))


def test_a_store_of_another_format_version_is_refused(tmp_path):
    path = str(tmp_path / "s")
    Store.create(path, BS)
    s = Store(path)
    with s.write() as t:
        t.set_meta("format", (FORMAT_VERSION + 1).to_bytes(4, "big"))
    s.close()
    with pytest.raises(UnsupportedFormat, match=f"version {FORMAT_VERSION + 1}"):
        Store(path)


def test_the_lock_admits_one_writer_and_names_the_holder(store):
    store.describe_lock_holder("pid 4242 mounted on /mnt/x")
    with pytest.raises(StoreLocked, match="pid 4242 mounted on /mnt/x"):
        Store(store.path)  # the lock is taken before LMDB is opened


def test_the_clean_flag_round_trips(store):
    store.set_clean(False)
    assert not store.was_clean()
    store.set_clean(True)
    assert store.was_clean()


# -- blocks, refcounts and counters -----------------------------------------------------------------
def test_a_block_named_twice_is_stored_once_and_lives_until_its_last_name_goes(store):
    data = b"shared block " * 300
    with store.write() as t:
        a, b = new_file(t, 2 * BS), new_file(t, BS)
        h = put(t, a, 0, data)
        put(t, a, 1, data)
        put(t, b, 0, data)
    check_invariants(store)
    with store.read() as t:
        assert t.refcount(h) == 3 and len(list(t.blocks())) == 1
        assert t.container_codec(h) == ZSTD and t.plain_length(h) == len(data)
    with store.write() as t:
        t.set_block(a, 0, None)
        t.truncate_blocks(a, 0)
    check_invariants(store)
    with store.read() as t:
        assert t.refcount(h) == 1 and t.block_hashes(a, 0, 10) == {}
        assert t.block_hashes(b, 0, 10) == {0: h}
    with store.write() as t:
        t.set_block(b, 0, None)
    check_invariants(store)
    with store.read() as t:
        assert t.refcount(h) == 0 and t.container(h) is None and t.counters.stored == 0


def test_zstd_and_raw_containers_are_kept_byte_for_byte(store):
    """The write path's containers (zstd, raw) go into the blocks table as handed in: the
    fixed prefix says they are not LM, so only an LM container is rewritten compact."""
    with store.write() as t:
        ino = new_file(t, 2 * BS)
        blobs = {}
        for idx, data in enumerate((b"text that compresses " * 200, os.urandom(BS))):
            h, blob, cid = block(data)
            t.set_block(ino, idx, h, blob, cid, len(data))
            blobs[h] = (blob, cid)
    with store.read() as t:
        assert {t.container_codec(h) for h in blobs} == {ZSTD, RAW}
        for h, (blob, _) in blobs.items():
            assert bytes(t.txn.get(h, db=t.db["blocks"])) == blob
    check_invariants(store)


def test_pointing_a_block_at_new_content_releases_the_old(store):
    with store.write() as t:
        ino = new_file(t, BS)
        old = put(t, ino, 0, b"old " * 1000, pending=True)
        new = put(t, ino, 0, os.urandom(BS), pending=True)
    check_invariants(store)
    with store.read() as t:
        assert t.container(old) is None and t.refcount(new) == 1
        assert [h for h, _ in t.pending()] == [new]  # a deleted block leaves the queue
        assert t.container_codec(new) == RAW


def test_a_new_hash_without_its_container_is_refused(store):
    with pytest.raises(ValueError, match="without its container"):
        with store.write() as t:
            t.set_block(new_file(t), 0, block_hash(b"x"))


def test_truncate_drops_exactly_the_blocks_past_the_end(store):
    with store.write() as t:
        ino = new_file(t, 5 * BS)
        hashes = [put(t, ino, i, bytes([i + 1]) * BS) for i in range(5)]
        t.truncate_blocks(ino, 2)
    check_invariants(store)
    with store.read() as t:
        assert t.block_hashes(ino, 0, 1 << 40) == {0: hashes[0], 1: hashes[1]}
        assert all(t.container(h) is None for h in hashes[2:])


def test_replacing_a_container_moves_the_counters_between_codecs(store):
    data = b"compressible text " * 200
    with store.write() as t:
        ino = new_file(t, BS)
        h = put(t, ino, 0, data, pending=True)
    raw = REG.encode(data, codecs=())
    with store.write() as t:
        t.replace_container(h, raw)
        t.remove_pending(h)
    check_invariants(store)
    with store.read() as t:
        assert t.container_codec(h) == RAW and list(t.pending()) == []
        assert t.counters.per_codec[ZSTD] == [0, 0, 0]
        assert t.counters.per_codec[RAW] == [1, len(data), len(raw)]
    with pytest.raises(KeyError):
        with store.write() as t:
            t.replace_container(block_hash(b"absent"), raw)


def test_a_failed_write_transaction_changes_nothing(store):
    with pytest.raises(RuntimeError):
        with store.write() as t:
            ino = new_file(t, BS)
            put(t, ino, 0, b"lost " * 100)
            raise RuntimeError("abort")
    check_invariants(store)
    with store.read() as t:
        assert list(t.blocks()) == [] and [i for i, _ in t.inodes()] == [ROOT_INO]
        assert t.inode_count_bound() == ROOT_INO  # the inode number was not handed out either


# -- inodes, names, xattrs, orphans -----------------------------------------------------------------
def test_inode_numbers_are_never_reused(store):
    with store.write() as t:
        a = new_file(t)
        t.delete_inode(a)
        b = new_file(t)
    assert b == a + 1
    with store.read() as t:
        assert t.inode(a) is None and t.inode(b) is not None


def test_deleting_an_inode_drops_its_blocks_xattrs_and_orphan_record(store):
    with store.write() as t:
        ino = new_file(t, 2 * BS)
        h = put(t, ino, 0, b"data " * 500)
        t.set_xattr(ino, b"user.a", b"1")
        t.add_orphan(ino)
    check_invariants(store)
    with store.write() as t:
        assert t.orphans() == [ino] and t.xattr_names(ino) == [b"user.a"]
        t.delete_inode(ino)
    check_invariants(store)
    with store.read() as t:
        assert t.inode(ino) is None and t.container(h) is None
        assert t.orphans() == [] and t.xattr(ino, b"user.a") is None
        assert t.counters.logical == 0


def test_directory_entries_list_in_name_order_and_resume_after_a_name(store):
    names = [b"b", b"a", b"c\xff", b"a.txt", b"B"]
    with store.write() as t:
        inos = {n: new_file(t) for n in names}
        for n, ino in inos.items():
            t.link(ROOT_INO, n, ino)
        other = new_file(t)
        t.link(other, b"a", inos[b"a"])  # another directory's entries never leak in
    with store.read() as t:
        listed = list(t.listdir(ROOT_INO))
        assert [n for n, _ in listed] == sorted(names)
        assert all(inos[n] == ino for n, ino in listed)
        assert [n for n, _ in t.listdir(ROOT_INO, after=b"a.txt")] == [b"b", b"c\xff"]
        assert t.lookup(ROOT_INO, b"a") == inos[b"a"] and t.lookup(ROOT_INO, b"zz") is None
        assert not t.is_empty_dir(ROOT_INO) and t.is_empty_dir(inos[b"b"])
    with store.write() as t:
        t.unlink(ROOT_INO, b"a")
    with store.read() as t:
        assert t.lookup(ROOT_INO, b"a") is None and t.lookup(other, b"a") == inos[b"a"]


def test_inodes_round_trip_with_symlink_targets(store):
    now = now_ns()
    link = Inode(stat.S_IFLNK | 0o777, 1000, 1000, 1, 5, now, now + 1, now + 2, target=b"/a\xffb")
    with store.write() as t:
        ino = t.next_ino()
        t.put_inode(ino, link)
    with store.read() as t:
        assert t.inode(ino) == link
        assert t.counters.logical == 0  # only regular files count as logical bytes
