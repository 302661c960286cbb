"""A store is private to its owner: mkfs makes it so whatever the umask, and mount fixes
(saying so in the log and on stderr) or refuses a store others could read or write."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from llmfs.mount import MountError, secure_store

from .conftest import LLMFS, fuse_available, in_proc_mounts, llmfs

FILES = ("data.mdb", "lock.mdb", "llmfs.lock", "llmfs.log")


def modes(store) -> dict[str, int]:
    out = {".": stat.S_IMODE(os.stat(store).st_mode)}
    for name in FILES:
        p = store / name
        if p.exists():
            out[name] = stat.S_IMODE(os.stat(p).st_mode)
    return out


def test_mkfs_makes_a_private_store_whatever_the_umask(tmp_path):
    store = tmp_path / "store"
    subprocess.run(LLMFS + ["mkfs", str(store)], check=True, capture_output=True, umask=0o022)
    assert modes(store) == {".": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600}
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o777)
    os.chmod(existing, 0o777)
    subprocess.run(LLMFS + ["mkfs", str(existing)], check=True, capture_output=True, umask=0)
    assert modes(existing) == {".": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600}


def test_secure_store_fixes_modes_and_names_what_it_changed(tmp_path):
    store = tmp_path / "store"
    llmfs("mkfs", store)
    (store / "llmfs.log").write_text("")
    os.chmod(store, 0o755)
    os.chmod(store / "data.mdb", 0o666)
    os.chmod(store / "llmfs.log", 0o604)
    changes = secure_store(str(store))
    assert len(changes) == 3 and "0755" in changes[0] and "0666" in changes[1]
    assert modes(store) == {".": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600, "llmfs.log": 0o600}
    assert secure_store(str(store)) == []


def test_secure_store_refuses_a_symlinked_store_file(tmp_path):
    store = tmp_path / "store"
    llmfs("mkfs", store)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not ours")
    os.chmod(elsewhere, 0o644)
    (store / "llmfs.log").symlink_to(elsewhere)
    with pytest.raises(MountError, match="symbolic link"):
        secure_store(str(store))
    assert stat.S_IMODE(os.stat(elsewhere).st_mode) == 0o644  # not followed


@pytest.mark.mount
@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse")
def test_mount_fixes_an_open_store_and_says_so(tmp_path):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(LLMFS + ["mkfs", str(store)], check=True, capture_output=True, umask=0o022)
    os.chmod(store, 0o755)
    for name in ("data.mdb", "lock.mdb"):
        os.chmod(store / name, 0o644)
    res = subprocess.run(LLMFS + ["mount", str(store), str(mnt)], capture_output=True, text=True, umask=0o022)
    try:
        assert res.returncode == 0, res.stderr
        assert "open to other users" in res.stderr and "data.mdb was mode 0644" in res.stderr
        assert modes(store) == {
            ".": 0o700,
            "data.mdb": 0o600,
            "lock.mdb": 0o600,
            "llmfs.lock": 0o600,
            "llmfs.log": 0o600,
        }
        (mnt / "f").write_text("x")
    finally:
        if in_proc_mounts(mnt):
            llmfs("umount", mnt)
    log = (store / "llmfs.log").read_text()
    assert "open to other users" in log and "lock.mdb was mode 0644" in log


def test_secure_store_refuses_what_it_cannot_fix(tmp_path, monkeypatch):
    store = tmp_path / "store"
    llmfs("mkfs", store)
    os.chmod(store / "data.mdb", 0o606)

    def refuse(fd, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)  # as for a store another user owns
    with pytest.raises(MountError, match="cannot be made private"):
        secure_store(str(store))
