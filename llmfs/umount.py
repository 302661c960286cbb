"""`llmfs umount MOUNTPOINT`: unmount and wait until the daemon has flushed, marked the store clean
and exited (the store's lock is free)."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from .mounts import llmfs_mounts
from .store import LOCK_FILE

# The daemon flushes buffered writes (at most its dirty limit) before exiting: seconds at most.
WAIT_SECONDS = 120


def find_mount(mountpoint: str) -> str | None:
    """The store path of the llmfs mount at `mountpoint`, from /proc/mounts."""
    mountpoint = os.path.realpath(mountpoint)
    for store, target in llmfs_mounts():
        if target == mountpoint:
            return store
    return None


def wait_for_store(store: str, timeout: float = WAIT_SECONDS) -> bool:
    """Wait until no process holds the store's lock."""
    deadline = time.monotonic() + timeout
    fd = os.open(os.path.join(store, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
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


def unmount(mountpoint: str, lazy: bool = False) -> None:
    store = find_mount(mountpoint)
    if store is None:
        raise RuntimeError(f"{mountpoint} is not an llmfs mount")
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip() or f"fusermount3 failed ({res.returncode})")
    if not wait_for_store(store):
        raise RuntimeError(f"unmounted, but the daemon of {store} did not exit within "
                           f"{WAIT_SECONDS} s")


def register(sub) -> None:
    p = sub.add_parser("umount", help="flush, unmount and wait for the daemon to exit")
    p.add_argument("mountpoint")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="detach now even if busy; the daemon exits when the last file closes")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        unmount(args.mountpoint, args.lazy)
    except RuntimeError as e:
        print(f"llmfs umount: {e}", file=sys.stderr)
        return 1
    return 0
