"""Compaction in a mounted filesystem: `llmfs compact` asks the daemon, kill -9 during
compaction loses nothing, and one round trip of a file through the real default model."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llmfs.codec.container import COMPACT_TAG

from llmfs.store import ROOT_INO, Store

from .conftest import Mount, force_unmount, in_proc_mounts, llmfs, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

GPL = Path("/usr/share/common-licenses/GPL-3").read_bytes()


@pytest.fixture
def mounted_with(tmp_path):
    made = []

    def make(*mkfs_args, mount_args=()):
        m = Mount(tmp_path / "store", tmp_path / "mnt")
        m.mnt.mkdir()
        llmfs("mkfs", m.store, *mkfs_args)
        m.mount(*mount_args)
        made.append(m)
        return m

    yield make
    for m in made:
        if in_proc_mounts(m.mnt):
            if llmfs("umount", m.mnt, check=False).returncode != 0:
                force_unmount(m.mnt)
        bad = [
            line
            for line in m.log().splitlines()
            if ("ERROR" in line or "Traceback" in line) and not any(a in line for a in m.allowed_errors)
        ]
        assert not bad, "\n".join(bad)


def getfattr(path, name) -> str:
    return subprocess.run(
        ["getfattr", "--only-values", "-n", name, str(path)], capture_output=True, text=True, check=True
    ).stdout


def test_compact_asks_the_daemon(mounted_with):
    m = mounted_with("--model", "tiny", "--block-size", "4K", mount_args=("--no-compaction",))
    (m.mnt / "d").mkdir()
    (m.mnt / "d" / "gpl").write_bytes(GPL[:20000])
    (m.mnt / "other").write_bytes(GPL[20000:30000])
    res = llmfs("compact", m.mnt, "--now", "--path", m.mnt / "d")
    # the tiny random model codes nothing smaller than zstd: all of them stay as they are
    assert "compacted 5 blocks" in res.stdout and "0 now stored by the LM" in res.stdout
    res = llmfs("compact", m.mnt, "--now")
    assert "compacted 3 blocks" in res.stdout
    assert "nothing to compact" in llmfs("compact", m.mnt, "--now").stdout
    assert getfattr(m.mnt / "d" / "gpl", "user.llmfs.codec") == "zstd"
    assert (m.mnt / "d" / "gpl").read_bytes() == GPL[:20000]
    m.umount()
    assert "nothing to compact" in llmfs("compact", m.store, "--now").stdout  # offline too


@pytest.mark.slow
def test_real_model_compaction_round_trip_and_kill9(mounted_with):
    """One block of real text through SmolLM2 in the filesystem: compacted smaller than zstd,
    read back identical; then kill -9 while the next compaction runs loses nothing."""
    m = mounted_with("--block-size", "4K", mount_args=("--no-compaction",))
    text = GPL[:4096]
    (m.mnt / "a").write_bytes(text)
    zstd_size = int(getfattr(m.mnt / "a", "user.llmfs.stored_size"))
    t0 = time.monotonic()
    res = llmfs("compact", m.mnt, "--now")
    assert "1 now stored by the LM" in res.stdout, res.stdout
    print(f"compacting one 4 KiB block took {time.monotonic() - t0:.1f} s")
    assert getfattr(m.mnt / "a", "user.llmfs.codec") == "lm"
    lm_size = int(getfattr(m.mnt / "a", "user.llmfs.stored_size"))
    assert lm_size < 0.6 * zstd_size, (lm_size, zstd_size)
    m.remount()  # a fresh daemon: the read decodes with the model named in the store
    assert (m.mnt / "a").read_bytes() == text

    (m.mnt / "b").write_bytes(GPL[4096:12288])
    compact = subprocess.Popen(
        [sys.executable, "-m", "llmfs.cli", "compact", str(m.mnt), "--now"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(3)  # the model is running on b's blocks
    m.kill9()
    compact.communicate(timeout=60)
    m.mount()
    assert (m.mnt / "a").read_bytes() == text
    assert (m.mnt / "b").read_bytes() == GPL[4096:12288]
    m.umount()

    # A damaged byte in the payload of the compact LM block (tag, model number, length,
    # payload): its reads are EIO through the daemon's LM decode path, never other bytes, and
    # the damage stays in that block; the one full fsck (it decodes every LM block: the
    # real model's slowest step here) names only it — b came through the kill -9 whole — and
    # --repair quarantines it.
    m.allowed_errors = ("unreadable",)
    store = Store(str(m.store))
    try:
        with store.write() as t:
            h = t.block_hashes(t.lookup(ROOT_INO, b"a"), 0, 0)[0]
            raw = bytearray(t.txn.get(h, db=t.db["blocks"]))
            assert raw[0] == COMPACT_TAG
            raw[len(raw) // 2] ^= 0x10
            t.txn.put(h, bytes(raw), db=t.db["blocks"])
    finally:
        store.close()
    m.mount()
    with pytest.raises(OSError) as e:
        (m.mnt / "a").read_bytes()
    assert e.value.errno == errno.EIO
    assert (m.mnt / "b").read_bytes() == GPL[4096:12288]
    m.umount()
    res = llmfs("fsck", "--repair", m.store, check=False)
    assert res.returncode == 1 and "/a (block 0)" in res.stdout and "/b" not in res.stdout, res.stdout
    res = llmfs("fsck", "--quick", m.store, check=False)
    assert res.returncode == 0 and "/a (block 0)" in res.stdout, res.stdout  # listed as quarantined


def test_bench_compaction_checks_its_own_result(tmp_path):
    """`llmfs bench compaction` end to end with the tiny model: it mounts, compacts, remounts,
    compares every file with its source and runs fsck — and says so."""

    def mounts_below() -> list[Path]:
        with open("/proc/mounts") as f:
            return [Path(line.split()[1]) for line in f if line.split()[1].startswith(f"{tmp_path}/")]

    try:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "llmfs.cli",
                "bench",
                "compaction",
                "--size",
                "12K",
                "--model",
                "tiny",
                "--write-size",
                "2M",
                "--dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "after unmount and mount: 0 of" in res.stdout
        assert "fsck --quick: exit 0" in res.stdout
        assert "each block alone, xz -9e" in res.stdout  # the baseline of independent blocks
        assert not mounts_below()
    finally:
        for m in mounts_below():
            force_unmount(m)
