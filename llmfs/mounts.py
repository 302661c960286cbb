"""The mount table, and which of its fuse.llmfs mounts are really served by an llmfs daemon.

/proc/self/mountinfo names a fuse.llmfs mount's source, the store path a daemon gives as fsname.
But any user can make a FUSE mount with subtype=llmfs and fsname=ANY/DIR: a command that trusted the
source would open (or, before, create) files under DIR with its own rights — root's, for `sudo
llmfs umount` — following whatever symlinks DIR holds. So the source is only a claim. A mount is
ours when the store's lock file, opened without following a symlink, without creating it and only
if it is a regular file, names

  * this mount point and this mount's device (major:minor; the daemon writes both once mounted),
  * a pid that is alive, whose command line is an llmfs mount daemon,
  * and the kernel lists that very pid as holding the flock on that very file (/proc/locks,
    device:inode) — which nobody can arrange for a daemon they did not start.

Nothing here opens anything in the store but that one file. Every function takes the mount table's
text and the /proc directory as parameters so that the checks can be tested with fake ones.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from .store import LOCK_FILE

FSTYPE = "fuse.llmfs"
LOCK_TEXT_MAX = 16384
_LOCK_TEXT = re.compile(r"mounted at (.*) by pid (\d+)(?: on device (\d+):(\d+))?\n?", re.S)


class NotOurs(Exception):
    """A fuse.llmfs mount that no running llmfs daemon is known to serve; the message says why."""


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    dev: tuple[int, int]


@dataclass(frozen=True)
class Daemon:
    pid: int
    store: str
    mountpoint: str
    start_time: int  # /proc/PID/stat field 22: tells a reused pid from ours


def lock_text(mountpoint: str, pid: int, dev: tuple[int, int] | None = None) -> str:
    """What a daemon writes into the store's lock file (also shown when a mount is refused)."""
    text = f"mounted at {mountpoint} by pid {pid}"
    return text + (f" on device {dev[0]}:{dev[1]}" if dev else "")


def parse_lock_text(text: str) -> tuple[str, int, tuple[int, int] | None] | None:
    m = _LOCK_TEXT.fullmatch(text)
    if m is None:
        return None
    dev = (int(m[3]), int(m[4])) if m[3] else None
    return m[1], int(m[2]), dev


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def read_mountinfo(text: str | None = None) -> list[MountEntry]:
    """The mounts of /proc/self/mountinfo (or of `text`), oldest first."""
    if text is None:
        with open("/proc/self/mountinfo") as f:
            text = f.read()
    out = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            out.append(
                MountEntry(
                    _unescape(fields[sep + 2]),
                    _unescape(fields[4]),
                    fields[sep + 1],
                    (int(major), int(minor)),
                )
            )
        except (ValueError, IndexError):
            continue
    return out


def mount_at(mountpoint: str, mountinfo: str | None = None) -> MountEntry | None:
    """The fuse.llmfs mount that is visible at `mountpoint` (the last one mounted there), or None
    if what is visible there is not one."""
    target = os.path.realpath(mountpoint)
    found = None
    for entry in read_mountinfo(mountinfo):
        if entry.target == target:
            found = entry
    return found if found is not None and found.fstype == FSTYPE else None


def mount_containing(path: str, mountinfo: str | None = None) -> MountEntry | None:
    """The innermost mount that holds `path` (a real path), if it is a fuse.llmfs one."""
    best = None
    for entry in read_mountinfo(mountinfo):
        t = entry.target
        if path == t or path.startswith(t.rstrip("/") + "/"):
            if best is None or len(t) >= len(best.target):
                best = entry
    return best if best is not None and best.fstype == FSTYPE else None


def own_device(mountpoint: str, store: str, mountinfo: str | None = None) -> tuple[int, int] | None:
    """For the daemon, once mounted: the device of its mount (the last fuse.llmfs mount of this
    store at this mount point)."""
    dev = None
    for entry in read_mountinfo(mountinfo):
        if entry.target == mountpoint and entry.fstype == FSTYPE and entry.source == store:
            dev = entry.dev
    return dev


def _read_lock_file(store: str) -> tuple[str, os.stat_result]:
    path = os.path.join(store, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise NotOurs(f"{path} cannot be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotOurs(f"{path} is not a regular file")
        return os.read(fd, LOCK_TEXT_MAX).decode(errors="replace"), st
    finally:
        os.close(fd)


def process_start(pid: int, proc: str = "/proc") -> int | None:
    """Start time of a live process (None if it is gone or a zombie)."""
    try:
        with open(os.path.join(proc, str(pid), "stat")) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_llmfs_daemon(pid: int, proc: str = "/proc") -> bool:
    """Whether the command line of `pid` is `llmfs mount ... -f` (how every daemon runs)."""
    try:
        with open(os.path.join(proc, str(pid), "cmdline"), "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    try:
        at = argv.index("mount")
    except ValueError:
        return False
    program = argv[:at]
    return any(a == "llmfs.cli" or os.path.basename(a) == "llmfs" for a in program) and any(
        a in ("-f", "--foreground") for a in argv[at:]
    )


def holds_flock(pid: int, st: os.stat_result, proc: str = "/proc") -> bool:
    """Whether /proc/locks lists `pid` holding a flock on the file with stat `st`."""
    try:
        with open(os.path.join(proc, "locks")) as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        fields = line.split()
        # "3: FLOCK  ADVISORY  WRITE 17280 fe:00:2146408 0 EOF"; waiters have "->" after the id
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, ino = fields[5].split(":")
            if int(fields[4]) == pid and (int(major, 16), int(minor, 16), int(ino)) == want:
                return True
        except ValueError:
            continue
    return False


def verify(entry: MountEntry, proc: str = "/proc") -> Daemon:
    """The daemon that serves this fuse.llmfs mount; NotOurs (saying why) if none is known to."""
    if entry.fstype != FSTYPE or not os.path.isabs(entry.source):
        raise NotOurs(f"{entry.target} is not an llmfs mount")
    text, st = _read_lock_file(entry.source)
    parsed = parse_lock_text(text)
    if parsed is None:
        raise NotOurs(f"the lock file of {entry.source} names no daemon")
    mountpoint, pid, dev = parsed
    if mountpoint != entry.target or dev != entry.dev:
        raise NotOurs(
            f"{entry.source} is not the store mounted at {entry.target} (its lock "
            f"file names {mountpoint}, device {dev[0] if dev else '?'}:"
            f"{dev[1] if dev else '?'}; the mount is device {entry.dev[0]}:"
            f"{entry.dev[1]})"
        )
    start = process_start(pid, proc)
    if start is None:
        raise NotOurs(f"the daemon of {entry.target} (pid {pid}) is not running")
    if not is_llmfs_daemon(pid, proc) or not holds_flock(pid, st, proc):
        raise NotOurs(f"pid {pid} is not the llmfs daemon holding {entry.source}")
    return Daemon(pid, entry.source, entry.target, start)


def running(daemon: Daemon, proc: str = "/proc") -> bool:
    """Whether the daemon is still running (not a later process that got its pid)."""
    return process_start(daemon.pid, proc) == daemon.start_time
