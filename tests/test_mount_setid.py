"""Set-user-ID and set-group-ID bits through a mount: the POSIX/Linux rules for who keeps them.

  * a write or a truncate by a process without CAP_FSETID clears S_ISUID, and S_ISGID if the
    file is group-executable; a privileged writer keeps both (whether S_ISGID without group
    execute goes for a writer outside the file's group differs between kernel versions and
    between FUSE and local filesystems: not tested);
  * chown of a regular file clears S_ISUID and S_ISGID (of a group-executable file), even by
    root; a directory keeps its S_ISGID.

Who clears them: the kernel for write, truncate and chown, as long as the filesystem does not
claim FUSE_HANDLE_KILLPRIV(_V2) — libfuse 3.14 (Debian 12) never passes either flag to the
kernel, whatever `want` says; libfuse 3.17 can, and a filesystem that turns it on (to spare the
GETXATTR security.capability the kernel sends before writes) takes these rules over. llmfs
itself for open(O_TRUNC): with atomic_o_trunc the kernel leaves that truncation, and its mode
change, to the filesystem (namespace.Filesystem.open)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from .conftest import Mount, force_unmount, fuse_available, llmfs

NOBODY = 65534


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory):
    """A mount other users may enter (-o allow_other), on a path they can reach; one for the
    module (each test works in a directory of its own: `mnt`)."""
    if not fuse_available() or shutil.which("setpriv") is None or os.getuid() != 0:
        pytest.skip("needs /dev/fuse, root and setpriv")
    top = Path(tempfile.mkdtemp(prefix="llmfs-setid-", dir="/tmp"))
    os.chmod(top, 0o755)  # tmp_path is 0700: other users could not reach the mount point
    m = Mount(tmp_path_factory.mktemp("setid") / "store", top / "mnt")
    m.mnt.mkdir()
    llmfs("mkfs", m.store)
    m.mount("-o", "allow_other")
    try:
        os.chmod(m.mnt, 0o755)
        yield m
        m.umount()
    finally:
        force_unmount(m.mnt)
        shutil.rmtree(top, ignore_errors=True)
    assert llmfs("fsck", m.store, check=False).returncode == 0
    bad = [line for line in m.log().splitlines() if "ERROR" in line or "Traceback" in line]
    assert not bad, "the daemon logged errors:\n" + "\n".join(bad)


@pytest.fixture
def mnt(shared_mount, request) -> Path:
    d = shared_mount.mnt / request.node.name
    d.mkdir()
    os.chmod(d, 0o777)
    return d


def as_nobody(*cmd: str) -> None:
    """Run cmd as an unprivileged user (no capabilities, not in group 0)."""
    res = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr


def mode_of(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def setid_file(p: Path, mode: int, gid: int = 0) -> Path:
    p.write_bytes(b"#!/bin/sh\n")
    os.chown(p, 0, gid)
    os.chmod(p, mode)
    assert mode_of(p) == mode
    return p


def test_an_unprivileged_write_clears_setuid_and_executable_setgid(mnt):
    f = setid_file(mnt / "f", 0o6777)
    as_nobody("sh", "-c", f"echo more >> {f}")
    assert mode_of(f) == 0o0777
    assert f.read_bytes() == b"#!/bin/sh\nmore\n"
    # S_ISGID without group execute is kept for a writer in the file's group
    g = setid_file(mnt / "g", 0o2766, gid=NOBODY)
    as_nobody("sh", "-c", f"echo more >> {g}")
    assert mode_of(g) == 0o2766


def test_a_privileged_write_keeps_the_bits(mnt):
    f = setid_file(mnt / "f", 0o6755)
    with open(f, "ab") as out:  # root: CAP_FSETID
        out.write(b"more\n")
    assert mode_of(f) == 0o6755


def test_an_unprivileged_truncate_clears_like_a_write(mnt):
    f = setid_file(mnt / "f", 0o6777)
    as_nobody("truncate", "-s", "3", str(f))
    assert mode_of(f) == 0o0777 and f.read_bytes() == b"#!/"
    g = setid_file(mnt / "g", 0o6777)
    as_nobody("sh", "-c", f": > {g}")  # open(O_TRUNC)
    assert mode_of(g) == 0o0777 and g.read_bytes() == b""


def test_chown_clears_the_bits_of_a_file_not_of_a_directory(mnt):
    f = setid_file(mnt / "f", 0o6755)
    os.chown(f, NOBODY, -1)  # by root, too
    assert mode_of(f) == 0o0755
    g = setid_file(mnt / "g", 0o6755)
    os.chown(g, -1, NOBODY)
    assert mode_of(g) == 0o0755
    d = mnt / "d"
    d.mkdir()
    os.chmod(d, 0o2775)
    os.chown(d, NOBODY, NOBODY)
    assert mode_of(d) == 0o2775
