"""Running under a service manager: sd_notify datagrams, journal-friendly logging, graceful stop.

sd_notify is the protocol of systemd's Type=notify services: the daemon sends newline-separated
`KEY=VALUE` assignments in one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or
an abstract name written with a leading '@'). We send READY=1 from FUSE's `init` callback, when the
kernel mount exists and the first request is about to be answered, and STOPPING=1 when the FUSE
loop has ended and the final flush begins. Pure Python, no dependency on python-systemd; outside a
service (no $NOTIFY_SOCKET) every call is a no-op.

Threading: `notify` opens a socket per call and may run on libfuse's threads; `on_stop` must run
on the main thread (it installs a signal handler), which FUSE's `destroy` callback does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys

log = logging.getLogger("llmfs")

# syslog priorities, which journald reads from a "<N>" line prefix (SyslogLevelPrefix=, on by default)
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def notify(*assignments: str) -> bool:
    """Send `KEY=VALUE` lines to $NOTIFY_SOCKET; False when there is none or it can't be reached
    (a missing service manager is never an error for the daemon)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not assignments:
        return False
    if address[0] == "@":  # abstract namespace
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False  # vsock (vsock:CID:PORT) is for VMs, not for us
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(assignments).encode(), address)
        return True
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", os.environ["NOTIFY_SOCKET"], e)
        return False


def under_systemd() -> bool:
    """Started by systemd (a service, or a mount unit's helper)."""
    return "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ


def stderr_is_journal() -> bool:
    """$JOURNAL_STREAM names stderr's device:inode when it is connected to journald; a child whose
    stderr was redirected elsewhere inherits the variable, so compare (systemd.exec(5))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return bool(value) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


class JournalFormatter(logging.Formatter):
    """One line per event with its syslog priority as "<N>"; journald adds time, unit and pid."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        return f"<{PRIORITY.get(record.levelno, 6)}>{text}"


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr: to the journal as priority-tagged lines, elsewhere as `llmfs: LEVEL: msg`.
    Neither carries a timestamp: journald adds its own, and a terminal doesn't need one."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("llmfs: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


_stopping = False


def on_stop(what: str) -> None:
    """(Once per process.) The FUSE loop has ended (unmount, SIGTERM or SIGINT) and the final flush starts: tell the
    service manager, and keep a second SIGTERM/SIGINT from killing the flush half-way. libfuse
    restores the default (fatal) handlers when its loop ends and unmounts before it calls destroy,
    so a signal in that short gap still kills us: fsync'ed data survives that (it is committed to
    the store), buffered writes and the clean-unmount mark do not."""
    global _stopping
    if _stopping:
        return
    _stopping = True

    def already_stopping(signum, _frame):
        log.warning("%s received while flushing; still finishing the flush", signal.Signals(signum).name)

    # Handlers first: whoever hears STOPPING=1 may signal again at once.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            signal.signal(sig, already_stopping)
        except ValueError:  # not on the main thread: nothing we can do here
            pass
    notify("STOPPING=1", f"STATUS=flushing and closing {what}")


def stopped() -> None:
    """The store is closed: a further SIGTERM/SIGINT/SIGHUP has nothing left to interrupt, so
    ignore them for the rest of the exit. (Python's teardown resets handlers written in Python to
    the fatal default, ignored ones it leaves alone.) Hardening after one run of
    test_second_sigterm_during_the_flush_loses_nothing on a loaded machine saw the daemon end by
    SIGTERM instead of exit 0 — cause not pinned down; no data was at stake in that test."""
    if not _stopping:
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not on the main thread
            pass


def detach_stale(mountpoint: str) -> bool:
    """Lazily detach the mount of a daemon that died (stat gives ENOTCONN), so that a restarted
    service can mount again; its store was left unclean and the new mount checks it."""
    res = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        log.error("cannot detach the dead mount on %s: %s", mountpoint, res.stderr.strip())
        return False
    log.warning("detached the mount of a daemon that died on %s", mountpoint)
    return True
