"""The sequential read and write paths in-process: whole blocks kept as views of the request
(writeback.py), reads into a caller's buffer straight from the store's map (namespace.py
_read_into, Registry.decode_into, fuseops.FUSE.read), the daemon's readahead and heap settings
(mount.py, heap.py). The mounted tests (test_mount_posix.py, test_mount_random.py) show the same
paths through the kernel."""

from __future__ import annotations

import ctypes
import os
import platform
import threading

import mfusepy
import pytest
from llmfs.cache import DecodeCache, Readahead
from llmfs.codec import Registry
from llmfs.codec.container import ChecksumMismatch
from llmfs.codec.registry import RAW, ZSTD

from llmfs import fsck, heap
from llmfs import namespace as ns
from llmfs.fuseops import FUSE, Operations
from llmfs.mount import READAHEAD, raise_readahead
from llmfs.store import ROOT_INO

from .conftest import llmfs, needs_fuse

BS = 4096
TEXT = b"".join(b"line %d of a text that compresses well\n" % i for i in range(2000))


@pytest.fixture
def fs(new_fs):
    f = new_fs(BS, cache=DecodeCache(1 << 20), dirty_limit=64 * BS, readahead=Readahead())
    yield f
    f.flush_all()
    problems, _ = fsck.run_checks(f.store)
    assert not problems, [p.message for p in problems]
    f.cache.close()


def codecs(fs, ino) -> list[int]:
    with fs.store.read() as t:
        return [t.container_codec(h) for _, h in sorted(t.block_hashes(ino, 0, 1 << 30).items())]


def test_a_callers_bytearray_is_copied_and_whole_blocks_of_bytes_are_not(fs):
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    ino = fs.handle_ino(fh)
    mutable = bytearray(b"m" * (2 * BS))
    fs.write(fh, mutable, 0)
    mutable[:] = b"x" * (2 * BS)  # the caller reuses its buffer: the file must not change
    kept = b"k" * (2 * BS)
    fs.write(fh, kept, 2 * BS)
    f = fs._files[ino]
    assert type(f.dirty[0]) is bytearray
    assert type(f.dirty[2]) is memoryview and f.dirty[2].obj is kept  # a view, not a copy
    fs.write(fh, b"PART", 2 * BS + 10)  # a part of a kept block: it becomes a bytearray
    assert type(f.dirty[2]) is bytearray
    want = b"m" * (2 * BS) + b"k" * 10 + b"PART" + b"k" * (2 * BS - 14)
    assert fs.read(fh, 4 * BS, 0) == want
    fs.flush(fh)
    assert fs.read(fh, 4 * BS, 0) == want
    fs.release(fh)


def test_views_are_kept_only_when_whole_blocks_are_most_of_the_request(fs):
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    f = fs._files[fs.handle_ino(fh)]
    fs.write(fh, b"a" * (3 * BS - 2), 1)  # one whole block (1) in a request of almost 3
    assert type(f.dirty[1]) is bytearray
    fs.write(fh, b"b" * (3 * BS), 4 * BS)
    assert all(type(f.dirty[i]) is memoryview for i in (4, 5, 6))
    fs.release(fh)


def test_whole_zero_blocks_are_holes_and_a_short_zero_tail_too(fs):
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    ino = fs.handle_ino(fh)
    data = b"x" * BS + bytes(2 * BS) + b"y" * BS + bytes(100)
    fs.write(fh, data, 0)
    fs.release(fh)
    with fs.store.read() as t:
        assert sorted(t.block_hashes(ino, 0, 10)) == [0, 3]
    fh = fs.open(ino, os.O_RDONLY, 0, 0)
    assert fs.read(fh, len(data) + 10, 0) == data
    fs.release(fh)


def test_read_into_a_buffer_mixes_dirty_stored_holes_and_the_short_tail(fs):
    text = TEXT[: 3 * BS]
    noise = os.urandom(2 * BS)
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    ino = fs.handle_ino(fh)
    fs.write(fh, text, 0)  # blocks 0-2: zstd
    fs.write(fh, noise, 5 * BS)  # blocks 5-6: raw; 3-4 a hole
    fs.write(fh, b"tail", 7 * BS)  # block 7: 4 bytes
    fs.flush(fh)
    assert codecs(fs, ino) == [ZSTD, ZSTD, ZSTD, RAW, RAW, RAW]  # 4 bytes: raw is smaller
    fs.write(fh, b"DIRTY", BS + 7)  # block 1 dirty again, over a stored one
    want = bytearray(7 * BS + 4)
    want[: 3 * BS] = text
    want[BS + 7 : BS + 12] = b"DIRTY"
    want[5 * BS : 7 * BS] = noise
    want[7 * BS :] = b"tail"
    out = bytearray(b"\xee" * (8 * BS))  # garbage where nothing is written: must not show
    assert fs.read_into(fh, memoryview(out), 0) == len(want)
    assert out[: len(want)] == want
    for offset, size in ((BS - 3, 2 * BS + 5), (5 * BS + 1, 2 * BS), (3 * BS + 9, 5), (7 * BS + 2, 100)):
        out = bytearray(b"\xee" * size)
        n = fs.read_into(fh, memoryview(out), offset)
        assert out[:n] == want[offset : offset + size]
    assert fs.read_into(fh, memoryview(bytearray(10)), len(want)) == 0
    fs.release(fh)


def test_raw_and_zstd_reads_bypass_the_decode_cache(fs):
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, TEXT[: 4 * BS] + os.urandom(4 * BS), 0)
    fs.release(fh)
    ino = fs.lookup(ROOT_INO, b"f")
    fh = fs.open(ino, os.O_RDONLY, 0, 0)
    assert fs.read(fh, 8 * BS, 0)[: 4 * BS] == TEXT[: 4 * BS]
    m = fs.cache.metrics()
    assert m["misses"] == m["hits"] == m["decoded_blocks"] == 0 and len(fs.cache) == 0
    fs.release(fh)


def test_blocks_new_in_the_open_group_are_read_from_the_group(fs):
    """The committed snapshot does not have what the open group holds: those containers come
    from the group (and, once committed, from the map)."""
    fs.store.start_group_commit(interval=3600)
    try:
        data = TEXT[: 3 * BS] + os.urandom(2 * BS)
        w = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
        fs.write(w, data, 0)
        ino = fs.handle_ino(w)
        fh = fs.open(ino, os.O_RDONLY, 0, 0)
        fs.release(w)  # stores the data into the group, not committed (a close leaves it to this)
        with fs.store.snapshot() as snap, fs.store.read() as t:
            hashes = t.block_hashes(ino, 0, 10)
            assert hashes and all(snap.container_view(h) is None for h in hashes.values())
        assert fs.read(fh, len(data), 0) == data
        fs.store.sync()
        with fs.store.snapshot() as snap:
            assert all(isinstance(snap.container_view(h), memoryview) for h in hashes.values())
        assert fs.read(fh, len(data), 0) == data
        fs.release(fh)
    finally:
        fs.store.stop_group_commit()


def test_a_block_damaged_in_the_map_fails_its_read_and_is_reported(fs, caplog):
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, os.urandom(3 * BS), 0)
    fs.release(fh)
    ino = fs.lookup(ROOT_INO, b"f")
    with fs.store.write() as t:
        h = t.block_hashes(ino, 1, 1)[1]
        blob = bytearray(t.container(h))
        blob[-1] ^= 1  # a raw payload's last byte: only the checksum can tell
        t.txn.put(h, bytes(blob), db=t.db["blocks"])
    fh = fs.open(ino, os.O_RDONLY, 0, 0)
    with pytest.raises(ns.CorruptData):
        fs.read_into(fh, memoryview(bytearray(3 * BS)), 0)
    assert "block 1" in caplog.text
    out = bytearray(BS)
    assert fs.read_into(fh, memoryview(out), 2 * BS) == BS  # the good blocks alone read
    fs.release(fh)
    with fs.store.write() as t:  # put it back for the fixture's fsck
        blob[-1] ^= 1
        t.txn.put(h, bytes(blob), db=t.db["blocks"])


@pytest.mark.parametrize("codec", [RAW, 1])
def test_decode_into_checks_before_it_copies(codec):
    reg = Registry()
    data = TEXT[:BS] if codec else os.urandom(BS)
    blob = reg.encode(data, (ZSTD,))
    assert reg.header(blob).codec_id == codec
    out = bytearray(100)
    assert reg.decode_into(blob, memoryview(out), 50) == 100
    assert out == data[50:150]
    assert reg.decode_into(blob, memoryview(bytearray(100)), BS - 30) == 30
    bad = bytearray(blob)
    bad[-1] ^= 1
    out = bytearray(b"\xee" * 100)
    with pytest.raises(ChecksumMismatch):
        reg.decode_into(bytes(bad), memoryview(out), 0)
    assert out == b"\xee" * 100  # nothing copied from a block that does not check


def test_fuse_read_writes_into_libfuses_buffer(fs):
    data = TEXT[: 2 * BS + 17]
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, data, 0)
    fs.flush(fh)
    fuse = object.__new__(FUSE)  # the callback alone, no mount
    fuse.operations, fuse.encoding, fuse.errors = Operations(fs), "utf-8", "surrogateescape"
    fi = mfusepy.fuse_file_info()
    fi.fh = fh
    buf = ctypes.create_string_buffer(3 * BS)
    ptr = ctypes.cast(buf, ctypes.POINTER(ctypes.c_byte))
    assert fuse.read(None, ptr, 3 * BS, 5, ctypes.pointer(fi)) == len(data) - 5
    assert buf.raw[: len(data) - 5] == data[5:]
    fs.release(fh)


def test_raise_readahead(tmp_path):
    bdi = tmp_path / "0:99"
    bdi.mkdir()
    (bdi / "read_ahead_kb").write_text("128\n")
    assert raise_readahead((0, 99), 1 << 20, str(tmp_path))
    assert (bdi / "read_ahead_kb").read_text() == "1024\n"
    (bdi / "read_ahead_kb").write_text("4096\n")
    assert raise_readahead((0, 99), 1 << 20, str(tmp_path))  # higher already: left alone
    assert (bdi / "read_ahead_kb").read_text() == "4096\n"
    assert not raise_readahead((0, 98), 1 << 20, str(tmp_path))  # no such device: the default stays


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_heap_settings_are_taken_by_glibc():
    assert heap.keep_freed_memory(128 << 20)


def test_sequential_io_through_the_mount(mounted):
    """1 MiB writes and reads through the kernel: zstd, a hole and raw blocks, read back after the
    file's pages are dropped, from its start and at unaligned offsets; READs of up to 1 MiB when
    the daemon runs as root (it raised the FUSE device's readahead)."""
    mib = 1 << 20
    data = (TEXT * 30)[: 2 * mib] + bytes(256 << 10) + os.urandom(3 * mib) + b"tail"
    path = mounted.mnt / "f"
    with open(path, "wb") as f:
        for off in range(0, len(data), mib):
            f.write(data[off : off + mib])
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read from the daemon again
        assert b"".join(iter(lambda: f.read(mib), b"")) == data
        for off, n in ((12345, 3 * mib), (2 * mib - 7, 300 << 10), (len(data) - 10, 100)):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.seek(off)
            assert f.read(n) == data[off : off + n]
    if os.geteuid() == 0:
        st = os.stat(mounted.mnt)
        bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        assert int(open(bdi).read()) * 1024 >= READAHEAD


class GatedRegistry(Registry):
    """A registry whose encodes wait for `gate` (to hold blocks in the encoder pool) and are
    counted by thread: 'pool' or 'flush'."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.calls = {"pool": 0, "flush": 0}

    def encode(self, data, codecs=(ZSTD,), fingerprint=None):
        pooled = threading.current_thread().name.startswith("llmfs-encode")
        if pooled:
            assert self.gate.wait(30)
        self.calls["pool" if pooled else "flush"] += 1
        return super().encode(data, codecs, fingerprint)


@pytest.fixture
def gated(new_fs):
    reg = GatedRegistry()
    f = new_fs(BS, registry=reg, cache=DecodeCache(1 << 20), dirty_limit=64 * BS)
    f.buffer.encoders = 2
    yield f, reg
    reg.gate.set()
    f.flush_all()
    f.buffer.close()
    problems, _ = fsck.run_checks(f.store)
    assert not problems, [p.message for p in problems]


def stored(fs, ino) -> list[bytes]:
    with fs.store.read() as t:
        return [t.container(h) for _, h in sorted(t.block_hashes(ino, 0, 1 << 30).items())]


def test_whole_blocks_are_encoded_ahead_and_the_flush_stores_the_same_containers(new_fs):
    data = (TEXT * 3)[: 6 * BS] + bytes(BS) + os.urandom(2 * BS) + b"tail"
    files = []
    for encoders in (0, 2):
        reg = GatedRegistry()
        fs = new_fs(BS, registry=reg, dirty_limit=64 * BS)
        fs.buffer.encoders = encoders
        fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
        ino = fs.handle_ino(fh)
        fs.write(fh, bytes(data[: 5 * BS]), 0)
        fs.write(fh, bytes(data[5 * BS :]), 5 * BS)
        f = fs._files[ino]
        assert len(f.encoding) == (9 if encoders else 0)  # the whole blocks; never the tail
        fs.fsync(fh)
        assert not f.encoding
        assert reg.calls == ({"pool": 8, "flush": 1} if encoders else {"pool": 0, "flush": 9})  # no zeros
        assert fs.read(fh, len(data) + 1, 0) == data
        fs.release(fh)
        files.append(stored(fs, ino))
        fs.buffer.close()
        problems, _ = fsck.run_checks(fs.store)
        assert not problems, [p.message for p in problems]
    assert files[0] == files[1]  # the hole (all zeros) too: found by its hash on the pool
    assert len(files[1]) == 9 and codecs_of(files[1]) == [ZSTD] * 6 + [RAW] * 3


def codecs_of(blobs: list[bytes]) -> list[int]:
    return [Registry().header(b).codec_id for b in blobs]


def test_a_block_changed_while_its_encoding_is_queued_stores_the_new_bytes(gated):
    fs, reg = gated
    reg.gate.clear()  # the pool's encodes wait: every change below races a queued encoding
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    ino = fs.handle_ino(fh)
    fs.write(fh, b"a" * (4 * BS), 0)
    fs.write(fh, b"b" * BS, BS)  # a whole block over a queued one
    fs.write(fh, b"PART", 2 * BS + 7)  # a part of a queued block: a bytearray now
    assert sorted(fs._files[ino].encoding) == [0, 1, 3]
    threading.Timer(0.3, reg.gate.set).start()  # the truncate's flush waits for the queue
    fs.truncate(ino, 3 * BS + 5, fh)  # drops block 3's queued whole form before it flushes
    want = b"a" * BS + b"b" * BS + b"a" * 7 + b"PART" + b"a" * (BS - 11) + b"a" * 5
    fs.fsync(fh)
    assert fs.read(fh, 4 * BS, 0) == want
    fs.release(fh)
    fs.flush_all()
    again = ns.Filesystem(fs.store, Registry())  # what the store holds, not the write buffer
    fh2 = again.open(ino, os.O_RDONLY)
    assert again.read(fh2, 4 * BS, 0) == want
    again.release(fh2)


def test_the_work_queued_for_encoding_stays_under_the_dirty_limit(gated):
    fs, reg = gated
    reg.gate.clear()
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    ino = fs.handle_ino(fh)
    for i in range(3):  # the same 30 blocks three times: superseded encodings stay in flight
        fs.write(fh, bytes([i + 1]) * (30 * BS), 0)
    assert fs.buffer._in_flight <= fs.buffer.dirty_limit
    assert fs.buffer._in_flight == 60 * BS  # two requests: the third did not fit
    assert not fs._files[ino].encoding  # the blocks now dirty are left to the flush
    reg.gate.set()
    fs.fsync(fh)
    assert reg.calls["flush"] == 1  # 30 equal blocks: one container
    assert fs.read(fh, 30 * BS, 0) == bytes([3]) * (30 * BS)
    fs.release(fh)
    fs.buffer.close()  # waits for the pool: what it held is released
    assert fs.buffer._in_flight == 0


def test_after_close_the_flush_encodes_in_place(gated):
    fs, reg = gated
    fs.buffer.close()
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, TEXT[: 4 * BS], 0)
    assert not fs._files[fs.handle_ino(fh)].encoding and fs.buffer._pool is None
    fs.release(fh)
    assert reg.calls == {"pool": 0, "flush": 4}


LARGE_WRITER = """
import os, sys
root, text = sys.argv[1], open(sys.argv[2], "rb").read()
i = 0
while True:
    data = text[i % 7 * 4096 :][: (1 + i % 3) << 20] + b"%d" % i  # 1-3 MiB, zstd blocks
    try:
        with open(os.path.join(root, f"f{i}"), "wb") as f:
            for off in range(0, len(data), 1 << 20):
                f.write(data[off : off + (1 << 20)])
            f.flush()
            os.fsync(f.fileno())
        print(i, flush=True)
    except OSError:
        break
    i += 1
"""


def test_kill9_while_blocks_are_encoded_ahead_keeps_every_fsynced_file(mounted, tmp_path):
    """Files of whole 1 MiB writes go through the encoder pool; kill -9 in the middle of the
    stream: every file whose fsync returned reads back whole after the next mount, fsck is clean."""
    import subprocess
    import sys
    import time

    from .conftest import llmfs

    src = tmp_path / "text"
    src.write_bytes((TEXT * 60)[: 4 << 20])
    text = src.read_bytes()
    writer = subprocess.Popen(
        [sys.executable, "-c", LARGE_WRITER, str(mounted.mnt), str(src)], stdout=subprocess.PIPE, text=True
    )
    time.sleep(4)
    mounted.kill9()
    out, _ = writer.communicate(timeout=60)
    synced = [int(x) for x in out.split()]
    assert len(synced) > 3, "the writer made too little progress to test anything"
    mounted.mount()
    for i in synced:
        want = text[i % 7 * 4096 :][: (1 + i % 3) << 20] + b"%d" % i
        assert (mounted.mnt / f"f{i}").read_bytes() == want, f"fsync'ed file f{i} damaged"
    mounted.umount()
    assert "clean" in llmfs("fsck", mounted.store).stdout
    mounted.mount()


def test_an_encoding_that_failed_on_the_pool_is_done_again_by_the_flush(gated):
    fs, reg = gated
    real = reg.encode
    failed = []

    def flaky(data, codecs=(ZSTD,), fingerprint=None):
        if threading.current_thread().name.startswith("llmfs-encode") and not failed:
            failed.append(1)
            raise MemoryError("no room for this container")
        return real(data, codecs, fingerprint)

    reg.encode = flaky
    fh = fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, TEXT[: 3 * BS], 0)
    fs.fsync(fh)  # the pool's task failed: the flush encodes its blocks itself
    assert failed and fs.read(fh, 3 * BS, 0) == TEXT[: 3 * BS]
    fs.release(fh)


@needs_fuse
@pytest.mark.mount
def test_bench_fs_prints_the_binding_floor_and_skips_small_files(tmp_path):
    """`llmfs bench fs --files 0`: the sequential rows with the in-memory filesystem of the same
    binding (memfs, mounted with llmfs's readahead) beside the disk, and no small-file rows."""
    out = llmfs("bench", "fs", "--size", "2M", "--files", "0", "--tree-files", "0", "--dir", tmp_path).stdout
    lines = {line.split("  ")[0]: line.split() for line in out.splitlines()}
    for row in ("write random", "read random", "write text", "read text"):
        cells = lines[row][2:]  # llmfs, disk, llmfs/disk, memfs, llmfs/memfs, unit
        assert len(cells) == 6 and cells[-1] == "MiB/s", out
        assert float(cells[3]) > 0 and cells[4].endswith("%"), out
    assert "small files" not in out and "create+write+close" not in out
    assert not any(tmp_path.iterdir())  # the bench's directory is gone
