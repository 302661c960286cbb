"""`llmfs umount MOUNTPOINT`: unmount and wait until the daemon has flushed, marked the store clean
and exited.

Which daemon that is comes from llmfs/mounts.py, which checks that the fuse.llmfs mount really is
served by an llmfs daemon before anything under its claimed store is trusted. A fuse.llmfs mount
that no live daemon serves (one whose daemon died, or someone's own FUSE mount that only claims to
be llmfs) is detached as asked, without waiting and without touching the directory it names.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from . import mounts
from .store import LOCK_FILE

# The daemon flushes buffered writes (at most its dirty limit) before exiting: seconds at most.
WAIT_SECONDS = 120


def wait_for_store(store: str, timeout: float = WAIT_SECONDS) -> bool:
    """Wait until no process holds the store's lock (the lock file is neither created nor followed
    if it is a symlink; a store without one has no holder)."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(os.path.join(store, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return True
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)


def wait_for_exit(daemon: mounts.Daemon, timeout: float = WAIT_SECONDS) -> bool:
    """Wait until the daemon process has exited (it releases the store's lock just before)."""
    deadline = time.monotonic() + timeout
    while mounts.running(daemon):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def unmount(mountpoint: str, lazy: bool = False) -> str | None:
    """Unmount; returns a note for the user when no running llmfs daemon served the mount."""
    entry = mounts.mount_at(mountpoint)
    if entry is None:
        raise RuntimeError(f"{mountpoint} is not an llmfs mount")
    try:
        daemon, note = mounts.verify(entry), None
    except mounts.NotOurs as e:
        daemon, note = None, f"{e}; detached {entry.target} without waiting for a daemon"
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [entry.target]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip() or f"fusermount3 failed ({res.returncode})")
    if daemon is not None and not wait_for_exit(daemon):
        raise RuntimeError(
            f"unmounted, but the daemon of {daemon.store} (pid {daemon.pid}) did "
            f"not exit within {WAIT_SECONDS} s"
        )
    return note


def register(sub) -> None:
    p = sub.add_parser("umount", help="flush, unmount and wait for the daemon to exit")
    p.add_argument("mountpoint")
    p.add_argument(
        "-z",
        "--lazy",
        action="store_true",
        help="detach now even if busy; the daemon exits when the last file closes",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        note = unmount(args.mountpoint, args.lazy)
    except RuntimeError as e:
        print(f"llmfs umount: {e}", file=sys.stderr)
        return 1
    if note:
        print(f"llmfs umount: {note}", file=sys.stderr)
    return 0
