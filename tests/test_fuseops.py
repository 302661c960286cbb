"""The FUSE edge in-process: the calls libfuse makes, in the order it makes them, without a kernel.
The mounted tests (test_mount_posix.py) show the same behaviour end to end."""

from __future__ import annotations

import errno
import os

import pytest
from llmfs.codec import Registry
from mfusepy import FuseOSError

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.fuseops import Operations
from llmfs.store import Store

BS = 4096
HIDDEN = "/.fuse_hidden0000000200000001"


@pytest.fixture
def ops(tmp_path):
    Store.create(str(tmp_path / "s"), BS)
    store = Store(str(tmp_path / "s"))
    o = Operations(ns.Filesystem(store, Registry()))
    yield o
    o.fs.flush_all()
    problems, _ = fsck.run_checks(store)
    assert not problems, [p.message for p in problems]
    store.close()


def fuse_errno(call) -> int | None:
    try:
        call()
    except FuseOSError as e:
        return e.errno
    return None


def hide(ops, path: str, hidden: str = HIDDEN) -> None:
    """What libfuse does on unlink(path) of an open file without hard_remove (lib/fuse.c:
    hidden_name() probes the new name with getattr, hide_node() renames to it)."""
    assert fuse_errno(lambda: ops.getattr(hidden)) == errno.ENOENT
    ops.rename(path, hidden, 0)


def test_ftruncate_by_handle_without_path(ops):
    fh = ops.create("/f", 0o644, os.O_RDWR)
    ops.write(None, b"abcdef", 0, fh)
    ops.truncate(None, 2, fh)  # libfuse 3 with nullpath_ok: no path, the handle
    assert ops.getattr(None, fh)["st_size"] == 2
    ops.truncate(None, 3 * BS, fh)
    assert ops.read(None, 3 * BS, 0, fh) == b"ab" + bytes(3 * BS - 2)
    ops.chmod(None, 0o600, fh)
    assert ops.getattr("/f")["st_mode"] & 0o777 == 0o600
    ops.release(None, fh)


def test_libfuse_hiding_becomes_an_unlink_with_an_alias(ops):
    fh = ops.create("/f", 0o644, os.O_RDWR)
    ops.write(None, b"data", 0, fh)
    hide(ops, "/f")
    assert ops.readdir("/", None) == [
        (".", {"st_ino": 1, "st_mode": 0o40755}, 0),
        ("..", {"st_ino": 1, "st_mode": 0o40000}, 0),
    ]
    assert fuse_errno(lambda: ops.getattr("/f")) == errno.ENOENT
    # libfuse subtracts one from a hidden node's st_nlink, asked by path or (the kernel refreshing
    # cached attributes of an open file) by the handle opened through it: both report nlink + 1
    assert ops.getattr(HIDDEN)["st_nlink"] == 1
    assert ops.getattr(None, fh)["st_nlink"] == 1
    ops.chmod(HIDDEN, 0o600)  # fchmod goes through the hidden path
    assert ops.getattr(None, fh)["st_mode"] & 0o777 == 0o600
    ino = ops.getattr(None, fh)["st_ino"]
    ops.release(None, fh)  # the last one: the alias goes with the file
    assert fuse_errno(lambda: ops.getattr(HIDDEN)) == errno.ENOENT
    assert fuse_errno(lambda: ops.unlink(HIDDEN)) == errno.ENOENT  # libfuse's, then: ignored
    with ops.fs.store.read() as t:
        assert t.inode(ino) is None and not t.orphans()


def test_hiding_a_hard_link_keeps_the_other_name(ops):
    fh = ops.create("/a", 0o644, os.O_RDWR)
    ops.link("/b", "/a")
    hide(ops, "/a")
    assert ops.getattr(None, fh)["st_nlink"] == 2  # the handle of the hidden node: libfuse
    assert ops.getattr(HIDDEN)["st_nlink"] == 2  # takes one off: 1
    fh2 = ops.open("/b", os.O_RDONLY)  # another libfuse node of the same file
    assert ops.getattr(None, fh2)["st_nlink"] == 1  # not hidden: nothing taken off
    ops.release(None, fh)
    ops.unlink(HIDDEN)  # libfuse: the hidden node's last descriptor closed
    assert fuse_errno(lambda: ops.getattr(HIDDEN)) == errno.ENOENT
    assert ops.getattr("/b")["st_nlink"] == 1
    ops.release(None, fh2)


def test_a_rename_to_a_hidden_looking_name_is_a_rename_unless_libfuse_hides(ops):
    fh = ops.create("/open", 0o644, os.O_RDWR)
    ops.release(None, ops.create("/closed", 0o644, os.O_RDWR))
    # no probe just before: an ordinary rename, the name stays listed
    ops.rename("/open", HIDDEN, 0)
    assert ".fuse_hidden0000000200000001" in [e[0] for e in ops.readdir("/", None)]
    # probed, and the file is closed here: libfuse still counted it open (the kernel sends
    # RELEASE after close returns, and we served it first), so the hiding is an unlink, no alias
    other = "/.fuse_hidden0000000300000002"
    hide(ops, "/closed", other)
    assert fuse_errno(lambda: ops.getattr(other)) == errno.ENOENT
    assert fuse_errno(lambda: ops.getattr("/closed")) == errno.ENOENT
    assert fuse_errno(lambda: ops.unlink(other)) == errno.ENOENT  # libfuse's, then: ignored
    assert ops._hidden == {}
    # probed, but with flags (libfuse hides with flags 0)
    ops.rename(HIDDEN, "/open", 0)
    assert fuse_errno(lambda: ops.getattr("/.fuse_hidden0000000400000003")) == errno.ENOENT
    ops.rename("/open", "/.fuse_hidden0000000400000003", 1)  # RENAME_NOREPLACE
    assert ops.getattr("/.fuse_hidden0000000400000003")["st_nlink"] == 1
    ops.release(None, fh)


def test_alias_of_a_file_in_a_removed_directory_is_dropped_at_release(ops):
    ops.mkdir("/d", 0o755)
    fh = ops.create("/d/x", 0o644, os.O_RDWR)
    hide(ops, "/d/x", "/d/.fuse_hidden0000000500000001")
    ops.rmdir("/d")  # POSIX allows it: the directory is empty
    ops.release(None, fh)  # libfuse can no longer build the hidden path to unlink it
    assert ops._hidden == {}


def test_rename_onto_an_open_hard_link_of_the_same_file_changes_nothing(ops):
    fh = ops.create("/a", 0o644, os.O_RDWR)
    ops.link("/b", "/a")
    hide(ops, "/b")  # libfuse hides the open target of rename("/a", "/b") first...
    ops.rename("/a", "/b", 0)  # ...then asks for the rename: POSIX does nothing
    names = sorted(e[0] for e in ops.readdir("/", None))[2:]
    assert names == ["a", "b"] and ops.getattr("/a")["st_nlink"] == 2
    ops.release(None, fh)
    assert ops._hidden == {}


def test_rename_noreplace_onto_an_open_file_fails_and_keeps_it(ops):
    fh = ops.create("/target", 0o644, os.O_RDWR)
    ops.write(None, b"keep", 0, fh)
    ops.release(None, ops.create("/src", 0o644, os.O_RDWR))
    hide(ops, "/target")
    assert fuse_errno(lambda: ops.rename("/src", "/target", 1)) == errno.EEXIST
    assert ops.getattr("/target")["st_nlink"] == 1 and ops.getattr("/target")["st_size"] == 4
    ops.release(None, fh)


def test_a_rename_right_after_an_unrelated_hide_is_an_ordinary_rename(ops):
    fh = ops.create("/a", 0o644, os.O_RDWR)
    ops.link("/b", "/a")
    hide(ops, "/a")  # unlink("/a") while open
    ops.getattr("/b")  # another call in between: the hide is no longer "just before"
    ops.rename("/b", "/a", 0)
    assert sorted(e[0] for e in ops.readdir("/", None))[2:] == ["a"]
    ops.release(None, fh)


def test_aliases_move_with_their_directory(ops):
    ops.mkdir("/d", 0o755)
    ops.mkdir("/e", 0o755)
    fh = ops.create("/d/x", 0o644, os.O_RDWR)
    fh2 = ops.create("/e/y", 0o644, os.O_RDWR)
    hide(ops, "/d/x", "/d/.fuse_hidden0000000500000001")
    hide(ops, "/e/y", "/e/.fuse_hidden0000000600000002")
    ops.rename("/d", "/d2", 0)
    assert ops.getattr("/d2/.fuse_hidden0000000500000001")["st_nlink"] == 1
    assert fuse_errno(lambda: ops.getattr("/d/.fuse_hidden0000000500000001")) == errno.ENOENT
    ops.rename("/d2", "/e", 2)  # RENAME_EXCHANGE
    assert ops.getattr("/e/.fuse_hidden0000000500000001")["st_ino"] == ops.getattr(None, fh)["st_ino"]
    assert ops.getattr("/d2/.fuse_hidden0000000600000002")["st_ino"] == ops.getattr(None, fh2)["st_ino"]
    ops.release(None, fh)
    ops.release(None, fh2)
    assert ops._hidden == {}


@pytest.mark.parametrize(
    "op", ["getattr", "unlink", "rmdir", "chmod", "open", "readlink", "getxattr", "create"]
)
def test_long_names_are_enametoolong(ops, op):
    """256 bytes, and 1,000 (the kernel passes names of up to 1,024 bytes to FUSE)."""
    args = {
        "chmod": (0o600,),
        "open": (os.O_RDONLY,),
        "getxattr": ("user.a",),
        "create": (0o644, os.O_RDWR | os.O_CREAT),
    }.get(op, ())
    for n in (256, 1000):
        for path in ("/" + "n" * n, "/" + "n" * n + "/x"):
            assert fuse_errno(lambda p=path: getattr(ops, op)(p, *args)) == errno.ENAMETOOLONG, (n, path[-2:])


def test_rename_noreplace_onto_a_file_closed_just_before_fails_and_keeps_it(ops):
    """libfuse may still count a descriptor whose RELEASE we served (the kernel sends it after
    close returns): it hides the closed target of a renameat2(RENAME_NOREPLACE) too, and the
    rename that follows must give the file back whole, not find it deleted."""
    fh = ops.create("/target", 0o644, os.O_RDWR)
    ops.write(None, b"keep", 0, fh)
    ops.release(None, fh)  # served; libfuse's count drops a moment later
    ops.release(None, ops.create("/src", 0o644, os.O_RDWR))
    hide(ops, "/target")
    assert fuse_errno(lambda: ops.rename("/src", "/target", 1)) == errno.EEXIST
    attrs = ops.getattr("/target")
    assert attrs["st_nlink"] == 1 and attrs["st_size"] == 4
    fh = ops.open("/target", os.O_RDONLY)
    assert ops.read(None, 4, 0, fh) == b"keep"
    ops.release(None, fh)
    assert ops._kept == {} and not ops.fs.is_open(attrs["st_ino"])


def test_a_closed_file_hidden_for_an_unlink_is_deleted_after_the_next_call(ops):
    fh = ops.create("/f", 0o644, os.O_RDWR)
    ops.write(None, b"x" * 10, 0, fh)
    ino = ops.getattr(None, fh)["st_ino"]
    ops.release(None, fh)
    hide(ops, "/f")  # libfuse's unlink of a file it still counted open: nothing follows it
    with ops.fs.store.read() as t:
        assert t.inode(ino) is not None  # kept until this thread's next call decides
    assert fuse_errno(lambda: ops.getattr("/f")) == errno.ENOENT  # the next call
    assert ops._kept == {}
    with ops.fs.store.read() as t:
        assert t.inode(ino) is None and not t.orphans()


def test_a_kept_file_is_let_go_after_a_while_without_a_next_call(ops, monkeypatch):
    import threading

    from llmfs import fuseops

    monkeypatch.setattr(fuseops, "KEEP_SECONDS", 0.05)
    fh = ops.create("/f", 0o644, os.O_RDWR)
    ino = ops.getattr(None, fh)["st_ino"]
    ops.release(None, fh)
    done = threading.Event()
    threading.Thread(target=lambda: (hide(ops, "/f"), done.set())).start()  # a thread that then idles
    assert done.wait(5)
    for _ in range(100):
        with ops.fs.store.read() as t:
            if t.inode(ino) is None:
                break
        threading.Event().wait(0.05)
    assert ops._kept == {}
    with ops.fs.store.read() as t:
        assert t.inode(ino) is None and not t.orphans()


def test_an_unmount_right_after_a_hide_leaves_no_orphan(ops):
    """`rm f && umount` within KEEP_SECONDS of f's close: the kept file is let go at destroy (not
    by a timer firing after the store is closed), and the clean end of the session deletes what
    was unlinked while open — fsck --quick of a cleanly unmounted store finds no orphan."""
    from llmfs.mount import finish

    fh = ops.create("/f", 0o644, os.O_RDWR)
    ops.write(None, b"x" * 10, 0, fh)
    ino = ops.getattr(None, fh)["st_ino"]
    ops.release(None, fh)
    hide(ops, "/f")  # kept: libfuse still counted it open
    fh2 = ops.create("/g", 0o644, os.O_RDWR)  # open, unlinked, never released (lazy unmount)
    ino2 = ops.getattr(None, fh2)["st_ino"]
    hide(ops, "/g")
    ops.destroy(None)
    assert ops._kept == {}
    assert finish(ops.fs) == 0
    with ops.fs.store.read() as t:
        assert t.inode(ino) is None and t.inode(ino2) is None and not t.orphans()
    problems, _ = fsck.run_checks(ops.fs.store, fsck.QUICK_CHECKS)
    assert problems == []
