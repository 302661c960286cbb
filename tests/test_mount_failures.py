"""Crashes, corruption and bad input: the store survives kill -9, a corrupt block reads as EIO and
fsck names its file, a path that is not a store or has another format is refused clearly."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import lmdb
import pytest

from llmfs.store import Store

from .conftest import llmfs, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

WRITER = textwrap.dedent("""
    import os, random, sys
    root = sys.argv[1]
    i = 0
    while True:
        data = random.Random(i).randbytes(random.Random(-i).randrange(1, 300_000))
        try:
            with open(os.path.join(root, f"f{i}"), "wb") as f:
                f.write(data)
                if i % 2 == 0:
                    f.flush()
                    os.fsync(f.fileno())
            if i % 2 == 0:
                print(i, flush=True)
        except OSError:
            break
        i += 1
""")


def test_kill9_during_writes_keeps_every_fsynced_file(mounted):
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(mounted.mnt)], stdout=subprocess.PIPE, text=True
    )
    time.sleep(3)
    mounted.kill9()
    out, _ = writer.communicate(timeout=60)
    synced = [int(x) for x in out.split()]
    assert len(synced) > 5, "the writer made too little progress to test anything"
    mounted.mount()  # notices the unclean shutdown, checks and recovers
    assert "not unmounted cleanly" in mounted.log()
    for i in synced:
        want = __import__("random").Random(i).randbytes(__import__("random").Random(-i).randrange(1, 300_000))
        assert (mounted.mnt / f"f{i}").read_bytes() == want, f"fsync'ed file f{i} damaged"
    mounted.umount()
    res = llmfs("fsck", mounted.store)
    assert "clean" in res.stdout
    mounted.mount()


def _corrupt_one_block(store_path, needle: bytes) -> None:
    """Flip a byte in the payload of the stored block whose container contains `needle`."""
    env = lmdb.open(str(store_path), max_dbs=16, map_size=1 << 40)
    blocks = env.open_db(b"blocks", create=False)
    with env.begin(write=True) as txn:
        for key, val in txn.cursor(db=blocks):
            if needle in val:
                i = val.index(needle)
                bad = bytearray(val)
                bad[i] ^= 0x01
                txn.put(key, bytes(bad), db=blocks)
                break
        else:
            raise AssertionError("block not found")
    env.close()


def test_corrupt_block_reads_as_eio_and_fsck_names_the_file(mounted):
    mounted.allowed_errors = ("unreadable",)
    mounted.fsck_after = False
    data = os.urandom(200_000)  # incompressible: stored raw, so the needle is in the container
    (mounted.mnt / "victim").write_bytes(data)
    (mounted.mnt / "bystander").write_bytes(b"fine\n")
    mounted.umount()
    _corrupt_one_block(mounted.store, data[70_000:70_032])
    res = llmfs("fsck", mounted.store, check=False)
    assert res.returncode == 4 and "/victim (block 1)" in res.stdout, res.stdout
    mounted.mount()
    with open(mounted.mnt / "victim", "rb") as f:
        assert f.read(65536) == data[:65536]  # the good block still reads
        with pytest.raises(OSError) as e:
            f.read(65536)
        assert e.value.errno == errno.EIO
    assert (mounted.mnt / "bystander").read_bytes() == b"fine\n"
    assert "unreadable" in mounted.log()


def test_mount_refuses_non_store_and_other_format(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "plain").mkdir()
    res = llmfs("mount", tmp_path / "plain", mnt, check=False)
    assert res.returncode == 1 and "not an llmfs store" in res.stderr
    assert "Traceback" not in res.stderr
    llmfs("mkfs", tmp_path / "s")
    env = lmdb.open(str(tmp_path / "s"), max_dbs=16, map_size=1 << 40)
    meta = env.open_db(b"meta", create=False)  # not inside the write txn: that deadlocks
    with env.begin(write=True) as txn:
        txn.put(b"format", (99).to_bytes(4, "big"), db=meta)
    env.close()
    res = llmfs("mount", tmp_path / "s", mnt, check=False)
    assert res.returncode == 1 and "format version 99" in res.stderr
    assert not os.path.ismount(mnt)


def test_second_mount_of_a_store_is_refused(mounted, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    res = llmfs("mount", mounted.store, other, check=False)
    assert res.returncode == 1 and "in use" in res.stderr and str(mounted.mnt) in res.stderr
    assert not os.path.ismount(other)
    with pytest.raises(Exception, match="in use"):
        Store(str(mounted.store))


BURST = textwrap.dedent("""
    import os, random, sys
    root, n = sys.argv[1], int(sys.argv[2])
    for i in range(n):
        with open(os.path.join(root, f"b{i}"), "wb") as f:
            f.write(random.Random(i).randbytes(1024 + 997 * (i % 150)))
    print("done", flush=True)
""")


@pytest.mark.parametrize("interval", ["5", "0.05"])
def test_kill9_after_a_burst_of_closes_leaves_each_file_absent_or_whole(mounted, interval):
    """No fsync in the burst: the files may be lost, but never torn. With a 5 s commit interval
    the burst is usually still in the daemon; at 0.05 s commits land inside the burst."""
    mounted.umount()
    mounted.mount("--commit-interval", interval)
    keep = os.urandom(100_000)
    with open(mounted.mnt / "keep", "wb") as f:
        f.write(keep)
        f.flush()
        os.fsync(f.fileno())
    n = 400
    res = subprocess.run(
        [sys.executable, "-c", BURST, str(mounted.mnt), str(n)], capture_output=True, text=True, timeout=300
    )
    assert res.stdout.strip() == "done", res.stderr
    mounted.kill9()
    mounted.mount()
    assert (mounted.mnt / "keep").read_bytes() == keep, "an fsync'ed file was lost"
    present = 0
    for i in range(n):
        p = mounted.mnt / f"b{i}"
        if p.exists():
            present += 1
            want = __import__("random").Random(i).randbytes(1024 + 997 * (i % 150))
            assert p.read_bytes() == want, f"b{i} is torn or garbage"
    mounted.umount()
    res = llmfs("fsck", mounted.store)
    assert "clean" in res.stdout
    mounted.mount()
    if interval != "5":
        assert present > 0, "no commit landed in the burst: the test tested nothing"
