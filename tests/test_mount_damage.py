"""A damaged byte in a stored container's header, through a real mount: the block's
range reads EIO (not EINVAL), everything else works, a mount after kill -9 still starts, fsck
names the file and --repair quarantines the block, after which fsck is clean and the file keeps
its size with the range still reading EIO."""

from __future__ import annotations

import errno
import os

import pytest

from llmfs.store import ROOT_INO, Store

from .conftest import llmfs, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

BS = 65536


def _text(seed: int) -> bytes:
    return b"".join(
        b"line %d of file %d, with words that compress\n" % (i, seed) for i in range(3 * BS // 40)
    )[: 3 * BS]


def _damage_header(store_path, name: bytes, idx: int) -> None:
    """Flip the codec id byte of block idx of file /name (the daemon is not running)."""
    store = Store(str(store_path))
    try:
        with store.write() as t:
            ino = t.lookup(ROOT_INO, name)
            h = t.block_hashes(ino, idx, idx)[idx]
            blob = bytearray(t.container(h))
            blob[5] ^= 0x5A
            t.txn.put(h, bytes(blob), db=t.db["blocks"])
    finally:
        store.close()


def test_damaged_header_reads_eio_and_stays_local(mounted):
    mounted.allowed_errors = ("unreadable",)
    victim, keep = _text(1), _text(2)
    (mounted.mnt / "victim").write_bytes(victim)
    (mounted.mnt / "keep").write_bytes(keep)
    (mounted.mnt / "bystander").write_bytes(b"fine\n")
    mounted.umount()
    _damage_header(mounted.store, b"victim", 1)
    _damage_header(mounted.store, b"keep", 1)
    mounted.mount()
    with open(mounted.mnt / "victim", "rb") as f:
        assert f.read(BS) == victim[:BS]
        with pytest.raises(OSError) as e:
            f.read(BS)
        assert e.value.errno == errno.EIO
        f.seek(2 * BS)
        assert f.read() == victim[2 * BS :]
    assert os.stat(mounted.mnt / "victim").st_size == 3 * BS
    os.statvfs(mounted.mnt)
    os.rename(mounted.mnt / "victim", mounted.mnt / "moved")
    os.unlink(mounted.mnt / "moved")
    (mounted.mnt / "bystander").write_bytes(b"overwritten\n")
    assert (mounted.mnt / "bystander").read_bytes() == b"overwritten\n"
    assert "/victim: block 1" in mounted.log()

    mounted.kill9()  # a mount after a crash starts despite the damaged block
    mounted.mount()
    with open(mounted.mnt / "keep", "rb") as f:
        f.seek(BS)
        with pytest.raises(OSError) as e:
            f.read(10)
        assert e.value.errno == errno.EIO
    mounted.umount()

    res = llmfs("fsck", mounted.store, check=False)
    assert res.returncode == 4 and "/keep (block 1)" in res.stdout, res.stdout
    res = llmfs("fsck", "--repair", mounted.store, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    res = llmfs("fsck", mounted.store, check=False)
    assert res.returncode == 0 and "quarantined" in res.stdout and "/keep (block 1)" in res.stdout
    mounted.mount()
    assert os.stat(mounted.mnt / "keep").st_size == 3 * BS
    with open(mounted.mnt / "keep", "rb") as f:
        assert f.read(BS) == keep[:BS]
        with pytest.raises(OSError) as e:
            f.read(10)
        assert e.value.errno == errno.EIO
