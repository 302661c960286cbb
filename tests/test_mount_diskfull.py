"""A full disk under the store (fusecompress lost writes when the disk filled):
writes fail with ENOSPC, nothing that was acknowledged with fsync is lost, deleting files makes
room again, and the store stays consistent."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from .conftest import Mount, force_unmount, in_proc_mounts, llmfs, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(disk)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_disk_full_gives_enospc_and_loses_nothing(small_disk, tmp_path):
    m = Mount(small_disk / "store", tmp_path / "mnt")
    m.mnt.mkdir()
    llmfs("mkfs", m.store)
    m.mount("--no-compaction")
    try:
        synced = {}
        with pytest.raises(OSError) as e:
            for i in range(1000):
                data = os.urandom(1 << 20)
                fd = os.open(m.mnt / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                synced[f"f{i}"] = data
        assert e.value.errno == errno.ENOSPC
        assert len(synced) >= 5
        for name, data in synced.items():
            assert (m.mnt / name).read_bytes() == data
        for name in list(synced)[:3]:  # deleting files makes room again
            os.unlink(m.mnt / name)
            del synced[name]
        (m.mnt / "after").write_bytes(b"room again")
        m.remount()
        for name, data in synced.items():
            assert (m.mnt / name).read_bytes() == data
        assert (m.mnt / "after").read_bytes() == b"room again"
        m.umount()
        assert "clean" in llmfs("fsck", m.store).stdout
    finally:
        if in_proc_mounts(m.mnt):
            if llmfs("umount", m.mnt, check=False).returncode != 0:
                force_unmount(m.mnt)
