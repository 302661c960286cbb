"""Damaged data stays local: one damaged stored byte costs only the reads of its block's
range (EIO, logged once with the file's path); unlink, overwrite, truncate, rename, stat, statfs
and compaction keep working; fsck names the file and --repair quarantines the block (the file keeps
its size, the range keeps reading as EIO) and then checks clean. And no stored byte can make a
decode allocate or compute without bound (zstd frame headers, LM token counts)."""

from __future__ import annotations

import logging
import os
import struct

import pytest
import zstandard
from llmfs.codec import ChecksumMismatch, ContainerError, Quarantined, Registry
from llmfs.codec.container import COMPACT_TAG, pack
from llmfs.codec.registry import DAMAGED, LM, ZSTD

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.compactor import Compactor
from llmfs.store import ROOT_INO, Store

from .fake_model import SlowZlibModel, compact_all

BS = 4096


def text(n: int, seed: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]
    out, x = bytearray(), seed
    while len(out) < n:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out += words[x % len(words)] + (b"\n" if x % 7 == 0 else b" ")
    return bytes(out[:n])


DATA = text(3 * BS, 1)  # victim: 3 blocks, block 1 gets damaged
OTHER = text(BS + 100, 2)  # a bystander file


# ---------------------------------------------------------------- the codec: bounded decoding
def _zstd_frame_claiming(content_size: int, payload: bytes) -> bytes:
    """A zstd frame whose header claims content_size bytes, holding `payload` as one raw block."""
    descriptor = 0xC0  # 8-byte frame content size, not single-segment, no checksum
    window = 0x00  # 1 KiB window
    block_header = (len(payload) << 3 | 0 << 1 | 1).to_bytes(3, "little")  # last, raw
    return (
        b"\x28\xb5\x2f\xfd"
        + bytes((descriptor, window))
        + struct.pack("<Q", content_size)
        + block_header
        + payload
    )


def test_zstd_frame_claiming_a_terabyte_is_corrupt_not_a_memory_error():
    reg = Registry()
    frame = _zstd_frame_claiming(1 << 40, b"x" * 100)
    blob = pack(ZSTD, 100, 0, frame)
    with pytest.raises(ChecksumMismatch, match="claims"):
        reg.decode(blob)


def test_zstd_output_is_bounded_by_the_stated_length():
    """A frame that does not state its size and expands past the container's length."""
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8 << 20))
    assert zstandard.frame_content_size(frame) == -1
    with pytest.raises(ChecksumMismatch, match="more than"):
        Registry().decode(pack(ZSTD, 100, 0, frame))


def test_a_container_claiming_more_than_a_block_is_corrupt():
    reg = Registry()
    data = b"a" * 5000
    blob = reg.encode(data)
    assert reg.decode_many([blob], max_length=8192) == [data]
    with pytest.raises(ChecksumMismatch, match="more than a block"):
        reg.decode_many([blob], max_length=4096)


def test_lm_payload_claiming_more_tokens_than_its_length_allows_is_refused():
    from llmfs.codec.container import varint
    from llmfs.codec.lm import ByteTokenizer, LMCodec

    from .fake_engine import BigramEngine

    codec = LMCodec((BigramEngine(max_seq_len=64), ByteTokenizer()), batch=2)
    good = codec.encode(b"hello world")
    assert codec.decode_many([(good, 11)]) == [b"hello world"]
    # the same payload with its token count (the first varint after the version) set to 2**40
    _total, pos = 11, 2
    crafted = good[:1] + varint(1 << 40) + good[pos:]
    with pytest.raises(ContainerError, match="tokens"):
        codec.decode_many([(crafted, 11)])


def test_quarantined_container_always_raises():
    with pytest.raises(Quarantined):
        Registry().decode(pack(DAMAGED, 10, 0, b"whatever"))


# ---------------------------------------------------------------- the namespace
@pytest.fixture
def fs(tmp_path):
    Store.create(str(tmp_path / "s"), BS)
    store = Store(str(tmp_path / "s"))
    f = ns.Filesystem(store, Registry(), None, dirty_limit=8 * BS)
    d = f.mkdir(ROOT_INO, b"dir", 0o755, 0, 0)
    for name, data in ((b"victim", DATA), (b"other", OTHER)):
        fh = f.create(d, name, 0o644, os.O_RDWR, 0, 0)
        f.write(fh, data, 0)
        f.release(fh)
    yield f
    store.close()


def victim(fs) -> int:
    return fs.lookup(fs.lookup(ROOT_INO, b"dir"), b"victim")


def damage(store: Store, ino: int, idx: int, offset: int) -> bytes:
    """Flip one byte at `offset` of the container of block idx of ino (negative: from the end)."""
    with store.write() as t:
        h = t.block_hashes(ino, idx, idx)[idx]
        blob = bytearray(t.container(h))
        blob[offset] ^= 0x5A
        t.txn.put(h, bytes(blob), db=t.db["blocks"])
    return h


# magic, version, codec id, length varint, checksum, inside the zstd payload
POSITIONS = [0, 4, 5, 6, 10, -20]


@pytest.mark.parametrize("offset", POSITIONS)
def test_damaged_byte_costs_only_the_reads_of_its_block(fs, offset, caplog):
    ino = victim(fs)
    damage(fs.store, ino, 1, offset)
    fh = fs.open(ino, os.O_RDONLY)
    caplog.set_level(logging.ERROR, logger="llmfs")
    assert fs.read(fh, BS, 0) == DATA[:BS]
    assert fs.read(fh, BS, 2 * BS) == DATA[2 * BS :]
    for _ in range(3):
        with pytest.raises(ns.CorruptData):
            fs.read(fh, 100, BS + 10)
    with pytest.raises(ns.CorruptData):  # a read spanning the block fails; its neighbours did not
        fs.read(fh, 3 * BS, 0)
    fs.release(fh)
    logged = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(logged) == 1 and "/dir/victim: block 1" in logged[0], logged
    # metadata, stat and statfs work
    assert fs.getattr(ino).size == len(DATA)
    assert fs.statfs()["f_blocks"] > 0
    assert fs.getxattr(ino, b"user.llmfs.codec") in (
        b"zstd",
        b"damaged:1,zstd:2",
        b"raw:1,zstd:2",
        b"lm:1,zstd:2",
    )
    d = fs.lookup(ROOT_INO, b"dir")
    fs.rename(d, b"victim", ROOT_INO, b"moved")
    assert fs.lookup(ROOT_INO, b"moved") == ino


@pytest.mark.parametrize("offset", POSITIONS)
def test_unlink_truncate_and_overwrite_of_a_damaged_file_work(fs, offset):
    ino = victim(fs)
    d = fs.lookup(ROOT_INO, b"dir")
    damage(fs.store, ino, 1, offset)
    with pytest.raises(ns.CorruptData):  # keeping part of the damaged block must read it
        fs.truncate(ino, BS + 5)
    fs.truncate(ino, 2 * BS)  # keeps the damaged block whole
    fs.truncate(ino, BS)  # drops it
    fh = fs.open(ino, os.O_RDWR | os.O_TRUNC)  # overwrite
    fs.write(fh, b"new", 0)
    fs.release(fh)
    assert fs.read_ino(ino, 10, 0) == b"new"
    fs.unlink(d, b"victim")
    fh = fs.open(fs.lookup(d, b"other"), os.O_RDONLY)
    assert fs.read(fh, len(OTHER), 0) == OTHER
    fs.release(fh)
    # the counters may be off by the damaged block (its header did not say how it was counted):
    # fsck --repair recounts, and then all is clean
    fsck.run_checks(fs.store, repair=True)
    assert fsck.run_checks(fs.store)[0] == []


@pytest.mark.parametrize("offset", POSITIONS)
def test_fsck_names_the_file_and_repair_quarantines_the_block(fs, offset):
    ino = victim(fs)
    h = damage(fs.store, ino, 1, offset)
    problems, repairable = fsck.run_checks(fs.store)
    assert any("/dir/victim (block 1)" in p.message for p in problems), problems
    assert repairable
    fsck.run_checks(fs.store, repair=True)
    assert fsck.run_checks(fs.store)[0] == []  # the repaired store checks clean
    with fs.store.read() as t:
        assert t.container_codec(h) == DAMAGED
        assert t.plain_length(h) == BS
        snap = fsck.Snapshot(t)
        assert any("/dir/victim (block 1)" in line for line in fsck.quarantined(snap, t))
    assert fs.getattr(ino).size == len(DATA)  # the file keeps its size ...
    fh = fs.open(ino, os.O_RDWR)
    assert fs.read(fh, BS, 0) == DATA[:BS]
    with pytest.raises(ns.CorruptData):  # ... and the range reads as EIO
        fs.read(fh, 10, BS)
    assert fs.getxattr(ino, b"user.llmfs.codec") == b"damaged:1,zstd:2"
    # restoring the content (from a backup) heals the block, in every file that shares it
    fs.write(fh, DATA[BS : 2 * BS], BS)
    fs.release(fh)
    assert fs.read_ino(ino, len(DATA), 0) == DATA
    with fs.store.read() as t:
        assert t.container_codec(h) != DAMAGED
    assert fsck.run_checks(fs.store)[0] == []


def test_fsck_does_not_quarantine_blocks_of_a_missing_model(fs):
    """A model that cannot be loaded is not damage: reported, never quarantined."""
    model = SlowZlibModel()
    compact_all(fs.store, fs.registry, model)
    registry = Registry()  # knows no model
    problems, repairable = fsck.run_checks(fs.store, registry=registry)
    assert problems and not repairable
    fsck.run_checks(fs.store, repair=True, registry=registry)
    with fs.store.read() as t:
        assert all(t.container_codec(h) == LM for h, _ in t.blocks())


def test_mount_after_a_crash_recounts_and_mounts_a_store_with_a_damaged_block(tmp_path):
    from llmfs.mount import open_filesystem

    Store.create(str(tmp_path / "s"), BS)
    store = Store(str(tmp_path / "s"))
    f = ns.Filesystem(store, Registry())
    fh = f.create(ROOT_INO, b"victim", 0o644, os.O_RDWR, 0, 0)
    f.write(fh, DATA, 0)
    f.release(fh)
    ino = f.lookup(ROOT_INO, b"victim")
    damage(store, ino, 1, 5)
    f.unlink(ROOT_INO, b"victim")  # counters now off by the damaged block
    fh = f.create(ROOT_INO, b"second", 0o644, os.O_RDWR, 0, 0)
    f.write(fh, DATA, 0)
    f.release(fh)
    damage(store, f.lookup(ROOT_INO, b"second"), 2, 0)
    store.set_clean(False)  # as if the daemon had been killed
    store.close()
    fs2, _models = open_filesystem(str(tmp_path / "s"))
    try:
        ino2 = fs2.lookup(ROOT_INO, b"second")
        assert fs2.read_ino(ino2, BS, 0) == DATA[:BS]
        with pytest.raises(ns.CorruptData):
            fs2.read_ino(ino2, BS, 2 * BS)
        problems = fsck.run_checks(fs2.store, [fsck.check_counters])[0]
        assert problems == []  # recounted at mount
    finally:
        fs2.cache.close()
        fs2.store.close()


# ---------------------------------------------------------------- compaction
def test_compaction_skips_and_reports_a_damaged_block_once(fs, caplog):
    model = SlowZlibModel()
    compactor = Compactor(fs.store, fs.registry, lambda: model, "fake-zlib", compact_after=0)
    ino = victim(fs)
    h_head = damage(fs.store, ino, 1, 5)  # header
    h_body = damage(fs.store, ino, 2, -20)  # payload
    caplog.set_level(logging.ERROR, logger="llmfs")
    res = compactor.compact(compactor.candidates(0))
    assert res.damaged == 2
    assert res.lm_blocks >= 2  # the others were compacted
    left = compactor.candidates(0)
    assert h_head not in left and h_body not in left  # never retried
    assert left == []
    assert compactor.compact(left).damaged == 0
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2
    fh = fs.open(fs.lookup(fs.lookup(ROOT_INO, b"dir"), b"other"), os.O_RDONLY)
    assert fs.read(fh, len(OTHER), 0) == OTHER
    fs.release(fh)


# ---------------------------------------------------------------- compact LM blocks (format 3)
def damage_at_rest(store: Store, ino: int, idx: int, offset: int) -> bytes:
    """Flip one byte at `offset` of block idx's container as the store keeps it (compact)."""
    with store.write() as t:
        h = t.block_hashes(ino, idx, idx)[idx]
        blob = bytearray(t.txn.get(h, db=t.db["blocks"]))
        assert blob[0] == COMPACT_TAG
        blob[offset] ^= 0x5A
        t.txn.put(h, bytes(blob), db=t.db["blocks"])
    return h


def _problems(fs) -> list:
    """fsck's findings with the fake model loaded, less the one it always has (the fake model
    cannot be embedded in the store: model_embedding)."""
    problems, _ = fsck.run_checks(fs.store, registry=fs.registry)
    return [p for p in problems if p.check != "model_embedding"]


# tag, model number, length varint (2 bytes), inside the payload
COMPACT_POSITIONS = [0, 1, 2, 3, -20]


@pytest.mark.parametrize("offset", COMPACT_POSITIONS)
def test_damaged_compact_block_costs_only_its_reads_and_fsck_quarantines_it(fs, offset):
    """The blocks kept compact (store format 3): a damaged byte anywhere in one of them, its
    model number included, reads as CorruptData for that block's range only, fsck names the
    file, --repair quarantines it, and the store then checks clean; the other blocks, compact
    too, read back exactly (checked against their keys)."""
    model = SlowZlibModel()
    compact_all(fs.store, fs.registry, model)
    ino = victim(fs)
    with fs.store.read() as t:
        assert t.model_numbers() == {0: model.fingerprint}
        h = t.block_hashes(ino, 0, 0)[0]
        assert t.txn.get(h, db=t.db["blocks"])[0] == COMPACT_TAG
        assert t.container_codec(h) == LM  # from the tag alone (prefetch asks it of every block)
        assert t.stored_size(h) == len(t.container(h)) - 44  # 48-byte keyed header, 4 at rest
    assert _problems(fs) == []
    damage_at_rest(fs.store, ino, 1, offset)
    fh = fs.open(ino, os.O_RDONLY)
    assert fs.read(fh, BS, 0) == DATA[:BS]
    assert fs.read(fh, BS, 2 * BS) == DATA[2 * BS :]
    with pytest.raises(ns.CorruptData):
        fs.read(fh, 100, BS + 10)
    fs.release(fh)
    fh = fs.open(fs.lookup(fs.lookup(ROOT_INO, b"dir"), b"other"), os.O_RDONLY)
    assert fs.read(fh, len(OTHER), 0) == OTHER
    fs.release(fh)
    problems = _problems(fs)
    assert any("/dir/victim (block 1)" in p.message for p in problems), problems
    assert all(p.repair for p in problems)
    fsck.run_checks(fs.store, repair=True, registry=fs.registry)
    assert _problems(fs) == []
    with pytest.raises(ns.CorruptData):
        fs.read_ino(ino, 10, BS)


def test_a_lost_model_number_is_reported_never_quarantined(fs):
    """A compact block naming a model number the store handed out but its modelnums table lost:
    the table is damaged, not the block — fsck reports it and --repair leaves the block alone
    (restoring the entry makes it read again)."""
    model = SlowZlibModel()
    compact_all(fs.store, fs.registry, model)
    with fs.store.write() as t:
        assert t.model_number(b"another!") == 1
        t.txn.delete((0).to_bytes(4, "big"), db=t.db["modelnums"])
    ino = victim(fs)
    with pytest.raises(ns.CorruptData):
        fs.read_ino(ino, 10, 0)
    problems = _problems(fs)
    assert any("model number 0" in p.message and "/dir/victim" in p.message for p in problems)
    assert all(p.repair is None for p in problems if "model number" in p.message)
    fsck.run_checks(fs.store, repair=True, registry=fs.registry)
    with fs.store.write() as t:
        assert t.txn.get(t.block_hashes(ino, 0, 0)[0], db=t.db["blocks"])[0] == COMPACT_TAG
        t.txn.put((0).to_bytes(4, "big"), model.fingerprint, db=t.db["modelnums"])
    assert fs.read_ino(ino, len(DATA), 0) == DATA
    fsck.run_checks(fs.store, repair=True, registry=fs.registry)  # the counters left them out
    assert _problems(fs) == []


def test_a_damaged_block_is_not_decoded_again_until_its_bytes_change(fs, monkeypatch):
    """Readers retry (readahead, then the kernel's single-page read, backup tools): the same
    container bytes fail the same way, so the second read of a damaged block is EIO without a
    second decode (an LM block's decode takes minutes on a CPU); once its bytes are what they
    were, it decodes again."""
    ino = victim(fs)
    with fs.store.read() as t:
        h = t.block_hashes(ino, 1, 1)[1]
        good = t.container(h)
    damage(fs.store, ino, 1, -20)
    decoded = []
    real = fs._decode_blobs
    monkeypatch.setattr(fs, "_decode_blobs", lambda blobs: decoded.append(len(blobs)) or real(blobs))
    fh = fs.open(ino, os.O_RDONLY)
    with pytest.raises(ns.CorruptData):
        fs.read(fh, 100, BS + 10)
    assert decoded == [1]
    for _ in range(3):
        with pytest.raises(ns.CorruptData):
            fs.read(fh, 100, BS + 10)
    assert decoded == [1]  # EIO at once
    assert fs.read(fh, BS, 2 * BS) == DATA[2 * BS :]  # its neighbours decode as before
    with fs.store.write() as t:
        t.txn.put(h, good, db=t.db["blocks"])  # the container's bytes change back
    assert fs.read(fh, 100, BS + 10) == DATA[BS + 10 : BS + 110]
    fs.release(fh)
