"""Shared fixtures. Mounted tests use `mounted` (a fresh store mounted in a temp dir, always
unmounted, failing the test if the daemon logged an unexpected error)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LLMFS = [sys.executable, "-m", "llmfs.cli"]


def llmfs(*args, check=True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(LLMFS + [str(a) for a in args], capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(
            f"llmfs {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    return res


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")


def daemon_pid(store: Path) -> int | None:
    try:
        text = (store / "llmfs.lock").read_text()
    except FileNotFoundError:
        return None
    for word in text.split():
        if word.isdigit():
            return int(word)
    return None


def in_proc_mounts(mnt: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


def force_unmount(mnt: Path) -> None:
    """Detach a mount even if its daemon is dead (stat on it then fails with ENOTCONN)."""
    if in_proc_mounts(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@dataclass
class Mount:
    store: Path
    mnt: Path
    allowed_errors: tuple = ()
    fsck_after: bool = True  # the fixture runs fsck on the store after the final unmount

    def mount(self, *opts) -> None:
        llmfs("mount", self.store, self.mnt, *opts)
        assert os.path.ismount(self.mnt)

    def umount(self) -> None:
        llmfs("umount", self.mnt)
        assert not os.path.ismount(self.mnt)

    def remount(self) -> None:
        self.umount()
        self.mount()

    def log(self) -> str:
        p = self.store / "llmfs.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def kill9(self) -> None:
        pid = daemon_pid(self.store)
        assert pid, "no daemon pid recorded"
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        force_unmount(self.mnt)


@pytest.fixture
def mounted(tmp_path):
    if not fuse_available():
        pytest.skip("needs /dev/fuse")
    m = Mount(tmp_path / "store", tmp_path / "mnt")
    m.mnt.mkdir()
    llmfs("mkfs", m.store)
    m.mount()
    try:
        yield m
    finally:
        if in_proc_mounts(m.mnt):
            res = llmfs("umount", m.mnt, check=False)
            if res.returncode != 0:
                force_unmount(m.mnt)
                pid = daemon_pid(m.store)
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    if m.fsck_after:
        res = llmfs("fsck", m.store, check=False)
        assert res.returncode == 0, f"fsck after the test:\n{res.stdout}{res.stderr}"
    bad = [
        line
        for line in m.log().splitlines()
        if ("ERROR" in line or "Traceback" in line or "CRITICAL" in line)
        and not any(a in line for a in m.allowed_errors)
    ]
    assert not bad, "the daemon logged errors:\n" + "\n".join(bad)


@pytest.fixture
def new_fs(tmp_path):
    """In-process filesystems on fresh stores: `new_fs(block_size, registry=None, **kwargs)` creates a
    store of that block size and returns a namespace.Filesystem on it (kwargs go to Filesystem;
    `fs.store` is the Store). Every store made is closed at teardown, after the test's own fixtures
    (which may flush and check it) have finished."""
    from llmfs.codec import Registry

    from llmfs.namespace import Filesystem
    from llmfs.store import Store

    made = []

    def make(block_size: int, registry=None, **kwargs) -> Filesystem:
        path = str(tmp_path / f"s{len(made)}")
        Store.create(path, block_size)
        store = Store(path)
        made.append(store)
        return Filesystem(store, registry if registry is not None else Registry(), **kwargs)

    yield make
    for store in made:
        store.close()
