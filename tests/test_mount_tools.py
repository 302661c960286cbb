"""Ordinary tools on a real mount, checked against the source by content; then unmount, mount
again, and everything is still identical."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from .conftest import llmfs, needs_fuse
from .treeutil import digest, make_source_tree

pytestmark = [needs_fuse, pytest.mark.mount]


def sh(*cmd, cwd=None):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed: {res.stdout}\n{res.stderr}"
    return res.stdout


def test_ordinary_tools(mounted, tmp_path):
    src = make_source_tree(tmp_path / "src")
    want = digest(src, times=True)
    mnt = mounted.mnt

    sh("cp", "-a", str(src), str(mnt / "cp"))
    assert digest(mnt / "cp", times=True) == want

    sh("tar", "--format=posix", "-cf", str(mnt / "t.tar"), "-C", str(src), ".")  # ns times
    (mnt / "untar").mkdir()
    sh("tar", "-xf", str(mnt / "t.tar"), "-C", str(mnt / "untar"))
    assert digest(mnt / "untar", times=True) == want
    sh("tar", "-df", str(mnt / "t.tar"), "-C", str(src))  # tar's own comparison

    sh("rsync", "-aH", f"{src}/", f"{mnt}/rsync/")
    assert digest(mnt / "rsync", times=True) == want

    repo = mnt / "repo"
    sh("cp", "-r", str(src / "py"), str(repo))
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.org",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.org",
    )
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "one"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    (repo / "a.txt").write_text("hello\n")
    subprocess.run(["git", "add", "a.txt"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "two"], cwd=repo, env=env, check=True)
    assert "two" in sh("git", "log", "--oneline", cwd=repo)
    assert sh("git", "status", "--porcelain", cwd=repo) == ""
    sh("git", "gc", "-q", cwd=repo)
    sh("git", "fsck", "--strict", cwd=repo)

    db = sqlite3.connect(mnt / "db.sqlite")
    db.execute("create table t (id integer primary key, name text, value real)")
    db.executemany(
        "insert into t (name, value) values (?, ?)", ((f"row {i}", i * 0.5) for i in range(10_000))
    )
    db.commit()
    db.execute("create index t_name on t(name)")
    db.commit()
    assert db.execute("select count(*), sum(value) from t").fetchone() == (10_000, 24_997_500.0)
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    db.close()

    (mnt / "over_a").write_text("a")
    (mnt / "over_b").write_text("b")
    sh("mv", str(mnt / "over_a"), str(mnt / "over_b"))
    assert (mnt / "over_b").read_text() == "a" and not (mnt / "over_a").exists()
    sh("ln", str(mnt / "over_b"), str(mnt / "hard"))
    sh("ln", "-s", "over_b", str(mnt / "soft"))
    assert os.stat(mnt / "hard").st_ino == os.stat(mnt / "over_b").st_ino
    assert os.stat(mnt / "over_b").st_nlink == 2
    assert (mnt / "soft").read_text() == "a"
    sh("chmod", "600", str(mnt / "hard"))
    assert os.stat(mnt / "over_b").st_mode & 0o777 == 0o600
    sh("touch", "-d", "2001-02-03 04:05:06.123456789", str(mnt / "hard"))
    assert (
        os.stat(mnt / "hard").st_mtime_ns
        == os.stat(
            Path(
                sh(
                    "sh",
                    "-c",
                    f"touch -d '2001-02-03 04:05:06.123456789' {tmp_path}/ref && echo {tmp_path}/ref",
                ).strip()
            )
        ).st_mtime_ns
    )

    def du(root):  # files only: directory sizes differ between filesystems
        return sh(
            "du",
            "-ab",
            *sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()),
            cwd=root,
        )

    assert du(mnt / "cp") == du(src)
    assert str(mnt) in sh("df", str(mnt))
    sh("setfattr", "-n", "user.color", "-v", "blue", str(mnt / "hard"))
    assert 'user.color="blue"' in sh("getfattr", "-d", str(mnt / "over_b"))
    sh("setfattr", "-x", "user.color", str(mnt / "hard"))
    assert "user.color" not in sh("getfattr", "-d", str(mnt / "over_b"))

    before = digest(mnt, times=True)
    mounted.remount()
    assert digest(mnt, times=True) == before
    assert digest(mnt / "cp", times=True) == want
    res = llmfs("fsck", mounted.store, check=False)  # refused while mounted
    assert res.returncode == 8 and "in use" in res.stderr


def test_allow_other_and_kernel_enforced_modes(tmp_path):
    """-o allow_other: other users see the mount, the kernel checks modes (default_permissions),
    and files they create are theirs (uid/gid from the FUSE context)."""
    import shutil
    import tempfile

    from .conftest import Mount, force_unmount

    if shutil.which("setpriv") is None or os.getuid() != 0:
        pytest.skip("needs root and setpriv")
    top = Path(tempfile.mkdtemp(prefix="llmfs-multi-", dir="/tmp"))
    os.chmod(top, 0o755)  # tmp_path is 0700: other users could not reach the mount point
    m = Mount(tmp_path / "store", top / "mnt")
    m.mnt.mkdir()
    llmfs("mkfs", m.store)
    m.mount("-o", "allow_other")
    try:
        os.chmod(m.mnt, 0o755)
        (m.mnt / "secret").write_text("root only")
        os.chmod(m.mnt / "secret", 0o600)
        (m.mnt / "public").write_text("everyone")
        (m.mnt / "shared").mkdir(mode=0o1777)
        os.chmod(m.mnt / "shared", 0o1777)

        def as_nobody(*cmd):
            return subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                capture_output=True,
                text=True,
            )

        assert as_nobody("cat", str(m.mnt / "public")).stdout == "everyone"
        res = as_nobody("cat", str(m.mnt / "secret"))
        assert res.returncode != 0 and "Permission denied" in res.stderr
        assert as_nobody("touch", str(m.mnt / "nope")).returncode != 0
        assert as_nobody("sh", "-c", f"echo mine > {m.mnt}/shared/n").returncode == 0
        st = os.stat(m.mnt / "shared" / "n")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        res = as_nobody("rm", "-f", str(m.mnt / "secret"))  # root's dir: not writable
        assert res.returncode != 0 and (m.mnt / "secret").exists()
        m.umount()
    finally:
        force_unmount(m.mnt)
        shutil.rmtree(top, ignore_errors=True)
