"""Which fuse.llmfs mounts are our own: `llmfs umount` and `llmfs stat` must not trust the
source column of a mount that anyone can make with subtype=llmfs,fsname=DIR. Unit tests against
a fake mount table and a fake /proc; then a real mount, and a foreign FUSE mount that claims to be
llmfs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmfs import mounts
from llmfs.mounts import MountEntry, NotOurs

from .conftest import daemon_pid, fuse_available, in_proc_mounts, llmfs

PID = 4242
START = 777


def mountinfo_line(target: str, source: str, dev=(0, 55), fstype="fuse.llmfs", mid=40) -> str:
    esc = lambda p: p.replace("\\", "\\134").replace(" ", "\\040")
    return (
        f"{mid} 27 {dev[0]}:{dev[1]} / {esc(target)} rw,nosuid,nodev,relatime - {fstype} "
        f"{esc(source)} rw,user_id=0,group_id=0,default_permissions\n"
    )


class FakeSystem:
    """A store with a lock file, a mount table naming it, and a /proc in which daemon PID holds
    the lock: what a healthy mount looks like. Tests then break one piece at a time."""

    def __init__(self, root: Path):
        self.store = root / "my store"
        self.store.mkdir()
        self.target = str(root / "mnt")
        self.dev = (0, 55)
        self.lock = self.store / "llmfs.lock"
        self.lock.write_text(mounts.lock_text(self.target, PID, self.dev))
        self.proc = root / "proc"
        (self.proc / str(PID)).mkdir(parents=True)
        self.set_process(b"/usr/bin/python3\0-m\0llmfs.cli\0mount\0s\0m\0-f\0--ready-fd\x004\0")
        self.set_locks(PID, self.lock)

    def set_process(self, cmdline: bytes, state: str = "S", start: int = START) -> None:
        (self.proc / str(PID) / "cmdline").write_bytes(cmdline)
        rest = " ".join(["0"] * 13)  # fields 9..21; 22 is the start time
        (self.proc / str(PID) / "stat").write_text(
            f"{PID} (python3 (x)) {state} 1 {PID} {PID} 0 -1 {rest} {start} 0 0\n"
        )

    def set_locks(self, pid: int, path: Path) -> None:
        st = os.stat(path)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        (self.proc / "locks").write_text(
            f"1: POSIX  ADVISORY  WRITE {pid} {dev} 0 EOF\n"
            f"2: FLOCK  ADVISORY  WRITE 1 00:00:1 0 EOF\n"
            f"3: FLOCK  ADVISORY  WRITE {pid} {dev} 0 EOF\n"
        )

    def entry(self, **changes) -> MountEntry:
        fields = dict(source=str(self.store), target=self.target, fstype="fuse.llmfs", dev=self.dev)
        fields.update(changes)
        return MountEntry(**fields)

    def verify(self, **changes) -> mounts.Daemon:
        return mounts.verify(self.entry(**changes), proc=str(self.proc))


@pytest.fixture
def system(tmp_path):
    return FakeSystem(tmp_path)


def test_lock_text_round_trip():
    for mnt in ["/mnt/a", "/mnt/with by pid 12 inside", "/mnt/new\nline"]:
        assert mounts.parse_lock_text(mounts.lock_text(mnt, 12)) == (mnt, 12, None)
        assert mounts.parse_lock_text(mounts.lock_text(mnt, 12, (0, 9))) == (mnt, 12, (0, 9))
    assert mounts.parse_lock_text("someone else's text") is None


def test_mountinfo_parsing_and_the_visible_mount(tmp_path):
    a, b = str(tmp_path / "a b"), str(tmp_path / "c")
    table = (
        mountinfo_line("/", "/dev/root", (8, 1), "ext4", 1)
        + mountinfo_line(a, "/srv/store one", (0, 50))
        + mountinfo_line(b, "/srv/s2", (0, 51))
        + mountinfo_line(b, "tmpfs", (0, 52), "tmpfs")
    )  # mounted over c later
    entries = mounts.read_mountinfo(table)
    assert entries[1] == MountEntry("/srv/store one", a, "fuse.llmfs", (0, 50))
    assert mounts.mount_at(a, table).source == "/srv/store one"
    assert mounts.mount_at(b, table) is None  # what is visible at c is the tmpfs
    assert mounts.mount_containing(a + "/x/y", table).target == a
    assert mounts.mount_containing(b + "/x", table) is None
    assert mounts.own_device(a, "/srv/store one", table) == (0, 50)


def test_a_healthy_mount_is_ours(system):
    d = system.verify()
    assert (d.pid, d.store, d.mountpoint, d.start_time) == (PID, str(system.store), system.target, START)
    assert mounts.running(d, str(system.proc))
    system.set_process(b"/usr/local/bin/llmfs\0--debug\0mount\0--config\0c.toml\0-f\0")
    assert system.verify().pid == PID


def test_a_foreign_mount_naming_any_directory_is_refused_without_touching_it(system, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    with pytest.raises(NotOurs, match="cannot be read"):
        system.verify(source=str(secret))
    assert list(secret.iterdir()) == []  # nothing created there
    with pytest.raises(NotOurs, match="not an llmfs mount"):
        system.verify(source="relative/dir")


def test_a_symlinked_or_special_lock_file_is_not_followed(system, tmp_path):
    real = tmp_path / "elsewhere"
    real.write_text(system.lock.read_text())
    system.lock.unlink()
    system.lock.symlink_to(real)
    with pytest.raises(NotOurs, match="cannot be read"):
        system.verify()
    system.lock.unlink()
    os.mkfifo(system.lock)  # O_NONBLOCK: never hangs on a FIFO
    with pytest.raises(NotOurs, match="not a regular file"):
        system.verify()


@pytest.mark.parametrize(
    "change, says",
    [
        (dict(target="/elsewhere"), "not the store mounted at /elsewhere"),
        (dict(dev=(0, 99)), "device 0:55; the mount is device 0:99"),
    ],
)
def test_the_lock_file_must_name_this_mount(system, change, says):
    with pytest.raises(NotOurs, match=says):
        system.verify(**change)


def test_a_lock_file_without_a_device_is_not_enough(system):
    system.lock.write_text(mounts.lock_text(system.target, PID))  # still mounting, or forged
    with pytest.raises(NotOurs, match="device"):
        system.verify()


def test_the_daemon_must_be_alive_and_llmfs_and_hold_the_lock(system, tmp_path):
    system.set_process(b"python3\0-m\0llmfs.cli\0mount\0s\0m\0-f\0", state="Z")
    with pytest.raises(NotOurs, match="not running"):
        system.verify()
    system.set_process(b"/home/u/fake-fs\0mount\0-f\0")
    with pytest.raises(NotOurs, match="is not the llmfs daemon"):
        system.verify()
    system.set_process(b"python3\0-m\0llmfs.cli\0mount\0s\0m\0")  # `llmfs mount` itself, not -f
    with pytest.raises(NotOurs, match="is not the llmfs daemon"):
        system.verify()
    system.set_process(b"python3\0-m\0llmfs.cli\0mount\0s\0m\0-f\0")
    other = tmp_path / "other"
    other.write_text("x")
    system.set_locks(PID, other)  # holds a lock, but on another file
    with pytest.raises(NotOurs, match="is not the llmfs daemon"):
        system.verify()
    system.set_locks(PID + 1, system.lock)  # someone else holds this one
    with pytest.raises(NotOurs, match="is not the llmfs daemon"):
        system.verify()
    (system.proc / str(PID) / "stat").unlink()
    with pytest.raises(NotOurs, match="not running"):
        system.verify()


def test_a_reused_pid_is_not_the_daemon(system):
    d = system.verify()
    system.set_process(b"python3\0-m\0llmfs.cli\0mount\0s\0m\0-f\0", start=START + 1)
    assert not mounts.running(d, str(system.proc))


needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse")


@pytest.mark.mount
@needs_fuse
def test_a_real_mount_is_recognised(mounted):
    entry = mounts.mount_at(str(mounted.mnt))
    d = mounts.verify(entry)
    assert d.pid == daemon_pid(mounted.store) and d.store == str(mounted.store)
    assert os.stat(mounted.mnt).st_dev == os.makedev(*entry.dev)
    res = llmfs("umount", mounted.mnt)
    assert res.stderr == "" and not mounts.running(d)


FAKE_FS = """
import os, sys
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy
class Ops(mfusepy.Operations):
    use_ns = True
mfusepy.FUSE(Ops(), sys.argv[1], foreground=True, fsname=sys.argv[2], subtype="llmfs")
"""


@pytest.mark.mount
@needs_fuse
def test_a_foreign_fuse_mount_claiming_llmfs(tmp_path):
    """Someone's own FUSE mount with subtype=llmfs,fsname=DIR: umount detaches it without creating
    anything in DIR, stat refuses it."""
    mnt, victim = tmp_path / "mnt", tmp_path / "victim"
    mnt.mkdir()
    victim.mkdir()
    (victim / "data.mdb").symlink_to(tmp_path / "not-there")
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_FS, str(mnt), str(victim)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if in_proc_mounts(mnt):
                break
            time.sleep(0.05)
        assert mounts.mount_at(str(mnt)).source == str(victim)
        res = llmfs("stat", mnt, check=False)
        assert res.returncode == 1 and "no running llmfs daemon serves" in res.stderr
        res = llmfs("compact", mnt, check=False)
        assert res.returncode == 1 and "no running llmfs daemon serves" in res.stderr
        res = llmfs("umount", mnt)
        assert "detached" in res.stderr and not in_proc_mounts(mnt)
        assert sorted(p.name for p in victim.iterdir()) == ["data.mdb"]
        assert not (tmp_path / "not-there").exists()
    finally:
        if in_proc_mounts(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        proc.kill()
        proc.wait()
