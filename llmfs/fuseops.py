"""The FUSE edge (mfusepy, libfuse 3): resolves paths, takes uid/gid from the caller's context, calls
the namespace, and turns its typed errors into errno. Nothing about what the filesystem *is* lives
here.

Open files whose last name is removed: libfuse's high-level API forgets the path of a file unlinked
with `hard_remove`, and then answers fstat(2) (a GETATTR without a file handle) with ESTALE by
itself. So we run without hard_remove: libfuse "hides" an open file that is unlinked or renamed
over by renaming it to `.fuse_hiddenXXXXXXXXYYYYYYYY` in its directory, and keeps that path for
the kernel's node. We turn that rename into what it stands for — the namespace unlinks the name
(the file becomes an orphan with st_nlink 0, kept while open, purged after a crash) — and remember
the hidden path in memory only, as an alias of the inode:
  * fstat, fchmod, fchown, futimens through the hidden path reach the file; readdir never lists it;
  * libfuse subtracts one from st_nlink of a hidden node (it expects the hidden name to be a real
    link), so getattr through an alias adds it back;
  * aliases follow renames of the directories above them; rmdir of their directory still works,
    after which fstat of the file fails with ESTALE (libfuse has no path for it any more; reads,
    writes and ftruncate go by the handle) — as does fstat of an open directory that was removed;
  * libfuse unlinks the hidden path when the last descriptor of its node closes, which drops the
    alias; release drops the aliases of a file nobody has open any more (libfuse cannot build the
    hidden path once its directory is gone; its unlink then finds nothing, which it ignores).
A rename is taken for libfuse's hiding only when the new name has exactly that form, in the same
directory, with no flags, and the call just before on the same thread was libfuse's getattr probe
of that name (hidden_name() checks that it is free): a user who renames a file to such a name
right after looking it up on the same FUSE thread gets an unlinked file instead — a name nobody
picks. (Whether the file is open here does not decide: libfuse may still count a descriptor whose
asynchronous RELEASE we have already served; _hide.)
libfuse also hides the open target of a rename before asking for the rename; where POSIX keeps the
target's name (the source is a hard link of the same file) or fails (RENAME_NOREPLACE), the
rename that follows at once on the same thread gives the name back.

ftruncate(2) (and a chmod that ftruncate's suid-clearing adds) arrives as SETATTR with the file
handle and, with nullpath_ok, no path: mfusepy's libfuse 3 wrappers drop the handle of truncate,
chmod, chown and utimens, so the FUSE subclass below passes it on and these methods use it.

Kernel attribute caching (mount.py's attr_timeout) and hard links: libfuse's high-level API gives
every *name* its own kernel inode, so the kernel caches a copy of a file's attributes per name, and
updates only the copy of the name a request came through. A change through one name (chmod, a
write, `ln` — nlink —, unlink, rename over it) leaves the other names' copies stale. So the names
of every file seen with more than one link are remembered here (from lookups and link(), kept
right across unlink and rename, in memory only: a file with one name needs none), with the hidden
aliases of open unlinked files, and a change through one name tells the kernel to drop the other
names' copies (fuse_invalidate_path: their attributes and cached pages):
  * a request that names its path (chmod, utimens, link, unlink, rename, setxattr, truncate): at
    once, before it returns, for the *other* names (the kernel updates the requested one from the
    reply; link also the source, whose nlink the kernel does not update). Nothing the kernel holds
    for a metadata request blocks an invalidation, and we hold no lock of ours then;
  * a request by file handle only (write, ftruncate, fchmod): the kernel holds the page locks of
    the name it came through during a write, which an invalidation of that name would wait for:
    a deadlock if done inside the request. The handle's name is known (the path it was opened by,
    kept across renames), and the others are invalidated by a thread of their own while the
    request waits for it — at most HANDLE_INVALIDATION_WAIT, so that a name we got wrong costs
    that delay once, never a hung mount.
Files with one name, and all directories, need nothing: every change to them comes through their
one kernel inode.

Threading: libfuse's multithreaded loop calls these methods from several threads at once; the
namespace is thread-safe. State kept here: the hidden aliases and the names of linked files (under
one lock), and per OS thread a call counter and what its last call left for the next one (each
thread touches only its own entries).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import queue
import re
import threading

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy  # noqa: E402  (reads FUSE_LIBRARY_NAME at import)
from mfusepy import FuseOSError  # noqa: E402

from . import namespace as ns  # noqa: E402
from .store import StoreError, StoreFull  # noqa: E402

log = logging.getLogger("llmfs")

ERRNO = {
    ns.NotFound: errno.ENOENT,
    ns.Exists: errno.EEXIST,
    ns.NotEmpty: errno.ENOTEMPTY,
    ns.NotADirectory: errno.ENOTDIR,
    ns.IsADirectory: errno.EISDIR,
    ns.InvalidArgument: errno.EINVAL,
    ns.NameTooLong: errno.ENAMETOOLONG,
    ns.NotPermitted: errno.EPERM,
    ns.NoAttribute: errno.ENODATA,
    ns.NotSupported: errno.ENOTSUP,
    ns.TooBig: errno.E2BIG,
    ns.NoSpace: errno.ENOSPC,
    ns.CorruptData: errno.EIO,
}
FUSE_UNKNOWN_INO = 0xFFFFFFFF
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
# The name libfuse gives an open file it hides (lib/fuse.c, hidden_name(): node id, counter).
HIDDEN_NAME = re.compile(rb"\.fuse_hidden[0-9a-f]{16}")
# Thread ids whose call counts are kept (the counts start over beyond: at worst one hiding is
# missed, and its file shows under its .fuse_hidden name until closed).
THREADS_REMEMBERED = 4096


def _groups(pid: int) -> tuple[int, ...]:
    """The supplementary groups of process pid (FUSE passes only uid and gid); none if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


CAP_FSETID = 4  # linux/capability.h


def _has_cap_fsetid(pid: int) -> bool:
    """Whether process (or thread) pid may keep set-ID bits when it truncates a file: CAP_FSETID
    in its effective set. Gone or unreadable: no (the bits are cleared, the safe side)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_FSETID & 1)
    except (OSError, ValueError):
        pass
    return False


def _groups_later(pid: int):
    """A function that reads pid's groups on its first call and remembers them (functools.cache
    does the same, at several times the cost of building it, on every open)."""
    found: list[tuple[int, ...]] = []

    def groups() -> tuple[int, ...]:
        if not found:
            found.append(_groups(pid))
        return found[0]

    return groups


def _errno_edge(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        tid = threading.get_native_id()
        if len(self._calls) > THREADS_REMEMBERED:  # libfuse ends idle threads and starts new ones
            self._calls.clear()
            self._marks.clear()
        self._calls[tid] = self._calls.get(tid, 0) + 1  # each thread writes only its own key
        try:
            return method(self, *args, **kwargs)
        except ns.FsError as e:
            raise FuseOSError(ERRNO[type(e)]) from None
        except StoreFull:
            raise FuseOSError(errno.ENOSPC) from None
        except StoreError as e:
            log.error("%s: %s", method.__name__, e)
            raise FuseOSError(errno.EIO) from None
        finally:
            if self._kept:  # a file kept by this thread's previous call (the hide): now decided
                kept = self._kept.get(tid)
                if kept is not None and kept[0] != self._calls.get(tid):
                    self._let_go(tid, kept[1])

    return wrapper


def _fs(path: str) -> bytes:
    """The bytes of a path as the binding got them: it decodes each with utf-8 and
    surrogateescape (mfusepy.FUSE's defaults, which FUSE below keeps), so this is exact for any
    name. Not os.fsencode, whose checks cost more than the encoding; called several times per
    request."""
    return path.encode("utf-8", "surrogateescape")


# How long the data of a closed file that libfuse hid is kept at most for the rename that may follow.
KEEP_SECONDS = 5.0
# How long a request by file handle waits for the invalidation of its file's other names.
HANDLE_INVALIDATION_WAIT = 0.1

_STAT_SIZE = ctypes.sizeof(mfusepy.c_stat)
_invalidate_path = mfusepy._libfuse.fuse_invalidate_path  # libfuse >= 3.1
_invalidate_path.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
_invalidate_path.restype = ctypes.c_int


class Invalidator:
    """Tells the kernel to drop its cached attributes and pages of libfuse paths (module
    docstring), now or from a thread of its own. `fuse` is libfuse's `struct fuse *`, known from
    init on; before that and after stop() nothing is sent (no kernel inode exists then)."""

    def __init__(self) -> None:
        self.fuse: int | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, fuse: int) -> None:
        self.fuse = fuse
        self._thread = threading.Thread(target=self._run, name="llmfs-invalidate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send what is queued and stop (destroy: libfuse frees `fuse` after it)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.fuse = None

    def now(self, paths) -> None:
        fuse = self.fuse
        if fuse is not None:
            for p in paths:
                _invalidate_path(fuse, p)  # -ENOENT: no kernel node for it now, nothing cached

    def soon(self, paths, wait: float = HANDLE_INVALIDATION_WAIT) -> None:
        """From the thread; waits up to `wait` seconds for it, so that the change is seen by
        the next call, and never forever (module docstring)."""
        if self.fuse is not None and paths:
            done = threading.Event()
            self._queue.put((list(paths), done))
            done.wait(wait)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            paths, done = item
            self.now(paths)
            done.set()


class Operations(mfusepy.Operations):
    use_ns = True  # integer-nanosecond times
    # Operations on open, unlinked files arrive with no path; we use the file handle.
    flag_nopath = True
    flag_nullpath_ok = True

    def __init__(self, fs: ns.Filesystem, on_ready=None, on_destroy=None, max_readahead: int | None = None):
        """max_readahead: the most bytes the kernel may read ahead of a reader (None: the kernel's
        offer). The kernel takes the smaller of this and its device's read_ahead_kb, which
        on_ready may raise (llmfs/mount.py: it knows the device), before the reply to INIT."""
        self.fs = fs
        self._max_readahead = max_readahead
        self._on_ready = on_ready
        self._on_destroy = on_destroy
        self._hidden: dict[bytes, int] = {}  # libfuse's hidden path -> inode (module docstring)
        self._hidden_lock = threading.Lock()
        # Per OS thread: how many calls it made, and what its last call left for the next one
        # (libfuse's hiding is a getattr, a rename, and in a rename the rename, all on one
        # thread). Not threading.local: libfuse's threads are foreign to Python, and ctypes gives
        # each callback a fresh thread state, so thread-local data would not outlive the call.
        self._calls: dict[int, int] = {}
        self._marks: dict[int, tuple[int, tuple]] = {}
        # inode -> the paths the kernel may hold a node for, of files seen with nlink > 1
        # (module docstring: kernel attribute caching); under _hidden_lock.
        self._names: dict[int, set[bytes]] = {}
        # file handle -> the path of the node it was opened through, kept across renames: a
        # GETATTR by handle of a hidden node needs the link back that libfuse takes off
        # (module docstring); under _hidden_lock.
        self._fh_paths: dict[int, bytes] = {}
        self.invalidator = Invalidator()
        # Per OS thread: a closed file its last hide unlinked, kept until the next call on that
        # thread (or KEEP_SECONDS) shows whether the hide was an unlink or a rename's (_hide).
        self._kept: dict[int, tuple[int, object]] = {}

    # -- lifecycle -------------------------------------------------------------------------------
    def init_with_config(self, conn, config):
        if conn is not None and self._max_readahead is not None:
            conn.max_readahead = self._max_readahead
        self.invalidator.start(mfusepy._libfuse.fuse_get_context().contents.fuse)
        if self._on_ready:
            self._on_ready()

    def destroy(self, path):
        self.invalidator.stop()
        for tid, (_, kept) in list(self._kept.items()):
            self._let_go(tid, kept)  # now, not by a timer that would find the store closed
        if self._on_destroy:
            self._on_destroy()

    # -- helpers ---------------------------------------------------------------------------------
    def _ino(self, path, fh=None) -> int:
        """The inode of an open handle (preferred: the path of an open file may be stale), else of
        the path (libfuse's hidden paths included)."""
        if fh is not None:
            return self.fs.handle_ino(fh)
        if path is None:
            raise ns.NotFound("no path")
        p = _fs(path)
        with self._hidden_lock:
            ino = self._hidden.get(p)
        return ino if ino is not None else self.fs.resolve(p)

    def _mark(self, *what) -> None:
        """Remember what this call did, for the next call on this thread only."""
        tid = threading.get_native_id()
        self._marks[tid] = (self._calls.get(tid, 0), what)

    def _previous(self) -> tuple:
        """What the previous call on this thread marked, if it was the one just before."""
        tid = threading.get_native_id()
        mark = self._marks.pop(tid, None)
        return mark[1] if mark is not None and mark[0] == self._calls.get(tid, 0) - 1 else ()

    def _hide(self, old: str, new: str, flags: int, previous: tuple) -> bool:
        """If this rename is libfuse hiding an open file (module docstring): unlink the old name
        in the namespace, remember the new path as an alias, and return True.

        libfuse hides a file its node counts open, and the kernel sends RELEASE after close(2)
        has returned: libfuse may still count a descriptor whose release we have served (an
        unlink right after a close, common once the kernel caches attributes). Then the file
        is closed here: the hiding is an unlink with no alias (libfuse's later unlink of the
        hidden path finds nothing, which it ignores) — unless the rename that made libfuse hide
        the file follows on this thread and gives the name back, so the file's data is kept
        (Filesystem.keep) until that next call, or KEEP_SECONDS, has passed."""
        p = _fs(new)
        if flags or previous != ("probe", p) or not HIDDEN_NAME.fullmatch(p.rpartition(b"/")[2]):
            return False
        head, old_head = p.rpartition(b"/")[0], _fs(old).rpartition(b"/")[0]
        ino = self._ino(old)
        if head != old_head:
            return False
        kept = None
        is_open = self.fs.is_open(ino)
        if not is_open:
            # Closed here, but counted open by libfuse: this is an unlink, or libfuse making way
            # for a rename onto the file, which may yet give the name back (RENAME_NOREPLACE, the
            # same file: rename()). Its data is kept until the next call on this thread decides.
            kept = self.fs.keep(ino)
        try:
            self.fs.unlink(*self._parent(old))
        except BaseException:
            if kept is not None:
                self.fs.let_go(kept)
            raise
        if kept is not None:
            tid = threading.get_native_id()
            self._kept[tid] = (self._calls.get(tid, 0), kept)
            timer = threading.Timer(KEEP_SECONDS, self._let_go, (tid, kept))
            timer.daemon = True
            timer.start()
        with self._hidden_lock:
            if is_open:
                self._hidden[p] = ino
            names = self._names.get(ino)
            if names is not None:
                names.discard(_fs(old))  # its node is the hidden alias now
            for fh, q in self._fh_paths.items():
                if q == _fs(old):
                    self._fh_paths[fh] = p
        self._changed(ino, new)  # nlink and ctime of its other names
        self._mark("hid", _fs(old), ino)
        return True

    def _let_go(self, tid: int, kept) -> None:
        """End the keeping of a hidden closed file (once, by whichever comes first: the thread's
        next call or the timer)."""
        with self._hidden_lock:
            current = self._kept.get(tid)
            if current is None or current[1] is not kept:
                return
            del self._kept[tid]
        try:
            self.fs.let_go(kept)
        except (ns.FsError, StoreError) as e:
            log.error("deleting an unlinked file: %s", e)

    def _others(self, ino: int, *skip: bytes) -> list[bytes]:
        """The paths of ino's other names (and hidden aliases) the kernel may cache, but `skip`."""
        with self._hidden_lock:
            names = self._names.get(ino)
            if names is None:
                return []
            out = [p for p in names if p not in skip]
            if self._hidden:
                out += [p for p, i in self._hidden.items() if i == ino and p not in skip]
        return out

    def _changed(self, ino: int, path: str | None, fh: int | None = None) -> None:
        """ino changed through `path`, or else through file handle `fh`: the kernel's copies of
        its other names are stale (module docstring)."""
        if ino not in self._names:  # (a racy look is fine: a file gets a second name only by link())
            return
        if path is not None:
            self.invalidator.now(self._others(ino, _fs(path)))
        else:
            with self._hidden_lock:
                own = self._fh_paths.get(fh)
            self.invalidator.soon(self._others(ino, own) if own is not None else self._others(ino))

    def _forget_name(self, ino: int, p: bytes) -> None:
        with self._hidden_lock:
            names = self._names.get(ino)
            if names is not None:
                names.discard(p)
                if not names:
                    del self._names[ino]

    def _move_names(self, old: str, new: str, exchange: bool) -> None:
        """A rename: remembered paths (names of linked files, the paths handles were opened by)
        at or below old move to new (and back with exchange), as libfuse's nodes do."""
        o, n = _fs(old), _fs(new)
        moves = ((o, n), (n, o)) if exchange else ((o, n),)

        def moved(p: bytes) -> bytes | None:
            for a, b in moves:
                if p == a or p.startswith(a + b"/"):
                    return b + p[len(a) :]
            return None

        with self._hidden_lock:
            for names in self._names.values():
                new_names = set()
                for p in list(names):
                    q = moved(p)
                    if q is not None:
                        names.discard(p)
                        new_names.add(q)
                names |= new_names
            for fh, p in self._fh_paths.items():
                q = moved(p)
                if q is not None:
                    self._fh_paths[fh] = q

    def _unhide(self, path: str) -> bool:
        """libfuse unlinks a hidden path after the last close: forget the alias."""
        with self._hidden_lock:
            return self._hidden.pop(_fs(path), None) is not None

    def _parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = _fs(path).rstrip(b"/").rpartition(b"/")
        return self.fs.resolve(head), name

    def _attrs(self, ino: int, inode) -> dict:
        blocks = -(-inode.size // 512) if inode.is_reg else 0
        return {
            "st_ino": ino,
            "st_mode": inode.mode,
            "st_nlink": inode.nlink,
            "st_uid": inode.uid,
            "st_gid": inode.gid,
            "st_size": inode.size,
            "st_atime": inode.atime,
            "st_mtime": inode.mtime,
            "st_ctime": inode.ctime,
            "st_rdev": inode.rdev,
            "st_blocks": blocks,
            "st_blksize": self.fs.block_size,
        }

    # -- metadata --------------------------------------------------------------------------------
    @_errno_edge
    def getattr(self, path, fh=None):
        try:
            if fh is None and path is not None and not self._hidden:
                ino, inode = self.fs.lookup_path(_fs(path))  # one snapshot
            else:
                ino = self._ino(path, fh)
                inode = self.fs.getattr(ino)
        except ns.NotFound:
            p = _fs(path) if path is not None else b""
            if HIDDEN_NAME.fullmatch(p.rpartition(b"/")[2]):
                self._mark("probe", p)  # libfuse checks that a name to hide a file under is free
            raise
        attrs = self._attrs(ino, inode)
        hidden = False
        if fh is None and path is not None:
            linked = inode.nlink > 1 and not inode.is_dir  # the kernel may cache it per name
            if self._hidden or linked:
                p = _fs(path)
                with self._hidden_lock:
                    hidden = p in self._hidden
                    if linked:
                        self._names.setdefault(ino, set()).add(p)
        elif fh is not None and self._hidden:  # the kernel refreshes attributes by handle too
            with self._hidden_lock:
                hidden = self._fh_paths.get(fh) in self._hidden
        # libfuse takes one off for the hidden name (module docstring) — except in the getattr
        # its setattr makes next on the same thread to reply with: the count is given as it is.
        if hidden and self._previous() != ("setattr",):
            attrs["st_nlink"] += 1
        return attrs

    @_errno_edge
    def opendir(self, path):
        return self.fs.opendir(self._ino(path))

    @_errno_edge
    def readdir(self, path, fh):
        entries = self.fs.readdir(self._ino(path, fh))
        out = []
        for name, ino, mode in entries:
            if ino is None:  # '..'
                ino = self._parent(path)[0] if path not in (None, "/") else 1 if path else FUSE_UNKNOWN_INO
            out.append((os.fsdecode(name), {"st_ino": ino, "st_mode": mode}, 0))
        return out

    @_errno_edge
    def releasedir(self, path, fh):
        self.fs.releasedir(fh)
        return 0

    @_errno_edge
    def access(self, path, amode):
        self._ino(path)  # with default_permissions the kernel checks the modes
        return 0

    @_errno_edge
    def mkdir(self, path, mode):
        uid, gid, _ = mfusepy.fuse_get_context()
        parent, name = self._parent(path)
        self.fs.mkdir(parent, name, mode, uid, gid)
        return 0

    @_errno_edge
    def mknod(self, path, mode, dev):
        uid, gid, _ = mfusepy.fuse_get_context()
        parent, name = self._parent(path)
        self.fs.mknod(parent, name, mode, dev, uid, gid)
        return 0

    @_errno_edge
    def symlink(self, target, source):  # mfusepy: target = the new link's path, source = its text
        uid, gid, _ = mfusepy.fuse_get_context()
        parent, name = self._parent(target)
        self.fs.symlink(parent, name, _fs(source), uid, gid)
        return 0

    @_errno_edge
    def readlink(self, path):
        return os.fsdecode(self.fs.readlink(self._ino(path)))

    @_errno_edge
    def link(self, target, source):  # mfusepy: target = the new name, source = the existing file
        parent, name = self._parent(target)
        ino = self._ino(source)
        self.fs.link(ino, parent, name)
        with self._hidden_lock:
            self._names.setdefault(ino, set()).update((_fs(source), _fs(target)))
        # The kernel gives the new name a node of its own and does not count the link on the
        # source's: every name but the new one is stale (module docstring).
        self.invalidator.now(self._others(ino, _fs(target)))
        return 0

    @_errno_edge
    def unlink(self, path):
        if not self._unhide(path):
            ino = self._ino(path) if self._names else None
            self.fs.unlink(*self._parent(path))
            if ino is not None and ino in self._names:
                self._forget_name(ino, _fs(path))
                self._changed(ino, path)  # nlink and ctime of its other names
        return 0

    @_errno_edge
    def rmdir(self, path):
        self.fs.rmdir(*self._parent(path))
        return 0

    @_errno_edge
    def rename(self, old, new, flags=0):
        previous = self._previous()
        if self._hide(old, new, flags, previous):
            return 0
        if previous[:2] == ("hid", _fs(new)):
            # libfuse hid this rename's target because it was open, before asking for the rename.
            # Where POSIX changes nothing — the source is another name of the same file — or
            # fails (RENAME_NOREPLACE), the target's name is given back.
            ino = previous[2]
            if flags & ns.RENAME_NOREPLACE or self._ino(old) == ino:
                self.fs.link(ino, *self._parent(new))
                if not flags & ns.RENAME_NOREPLACE:
                    self._move_names(old, new, False)  # libfuse moved the source's node there
                self._changed(ino, new)
                if flags & ns.RENAME_NOREPLACE:
                    raise ns.Exists(new)
                return 0
        op, oname = self._parent(old)
        np_, nname = self._parent(new)
        src = dst = None
        if self._names:  # linked files this rename changes (ctime; the replaced one's nlink)
            src = self._ino(old)
            try:
                dst = self._ino(new)
            except ns.NotFound:
                pass
        self.fs.rename(op, oname, np_, nname, flags)
        exchange = bool(flags & ns.RENAME_EXCHANGE)
        self._move_hidden(old, new, exchange)
        if dst is not None and dst != src and not exchange:
            self._forget_name(dst, _fs(new))  # the replaced file lost this name
        self._move_names(old, new, exchange)
        for ino in {src, dst} - {None}:
            if ino in self._names:  # the kernel updates the nodes at old and new itself
                self.invalidator.now(self._others(ino, _fs(old), _fs(new)))
        return 0

    def _move_hidden(self, old: str, new: str, exchange: bool) -> None:
        """A directory moved: the hidden paths below it move with it, as libfuse's nodes do."""
        o, n = _fs(old) + b"/", _fs(new) + b"/"
        with self._hidden_lock:
            if not self._hidden:
                return
            moved = {}
            for p in list(self._hidden):
                if p.startswith(o):
                    moved[n + p[len(o) :]] = self._hidden.pop(p)
                elif exchange and p.startswith(n):
                    moved[o + p[len(n) :]] = self._hidden.pop(p)
            self._hidden.update(moved)

    @_errno_edge
    def chmod(self, path, mode, fh=None):
        ino = self._ino(path, fh)
        self.fs.chmod(ino, mode)
        self._changed(ino, path if fh is None else None, fh)
        self._mark("setattr")  # (getattr)
        return 0

    @_errno_edge
    def chown(self, path, uid, gid, fh=None):
        ino = self._ino(path, fh)
        self.fs.chown(ino, uid, gid)
        self._changed(ino, path if fh is None else None, fh)
        self._mark("setattr")  # (getattr)
        return 0

    @_errno_edge
    def utimens(self, path, times=None, fh=None):
        if times is None:
            now = ns.now_ns()
            times = (now, now)

        def resolve(t):
            if t == UTIME_OMIT:
                return None
            return ns.now_ns() if t == UTIME_NOW else t

        ino = self._ino(path, fh)
        self.fs.utimens(ino, resolve(times[0]), resolve(times[1]))
        self._changed(ino, path if fh is None else None, fh)
        self._mark("setattr")  # (getattr)
        return 0

    @_errno_edge
    def statfs(self, path):
        return self.fs.statfs()

    # -- xattrs ----------------------------------------------------------------------------------
    @_errno_edge
    def getxattr(self, path, name, position=0):
        if self._hidden:
            with self._hidden_lock:
                ino = self._hidden.get(_fs(path))
            if ino is not None:
                return self.fs.getxattr(ino, _fs(name))
        return self.fs.getxattr_path(_fs(path), _fs(name))  # (namespace: asked before writes)

    @_errno_edge
    def setxattr(self, path, name, value, options, position=0):
        ino = self._ino(path)
        self.fs.setxattr(ino, _fs(name), value, options)
        self._changed(ino, path)
        return 0

    @_errno_edge
    def listxattr(self, path):
        return [os.fsdecode(n) for n in self.fs.listxattr(self._ino(path))]

    @_errno_edge
    def removexattr(self, path, name):
        ino = self._ino(path)
        self.fs.removexattr(ino, _fs(name))
        self._changed(ino, path)
        return 0

    # -- file data -------------------------------------------------------------------------------
    @_errno_edge
    def create(self, path, mode, flags):
        uid, gid, pid = mfusepy.fuse_get_context()
        parent, name = self._parent(path)
        fh = self.fs.create(parent, name, mode, flags, uid, gid, lambda: _has_cap_fsetid(pid))
        with self._hidden_lock:
            self._fh_paths[fh] = _fs(path)
        if flags & os.O_TRUNC and self._names:  # an existing file, opened and truncated
            self._changed(self.fs.handle_ino(fh), path)
        return fh

    @_errno_edge
    def open(self, path, flags):
        uid, gid, pid = mfusepy.fuse_get_context()  # prefetch only what the opener may read
        # Its groups are read from /proc only if a sibling's group decides (once per open).
        ino = self._ino(path)
        fh = self.fs.open(ino, flags, uid, gid, _groups_later(pid), lambda: _has_cap_fsetid(pid))
        with self._hidden_lock:
            self._fh_paths[fh] = _fs(path)
        if flags & os.O_TRUNC:
            self._changed(ino, path)
        return fh

    @_errno_edge
    def read(self, path, size, offset, fh):
        return self.fs.read(fh, size, offset)

    @_errno_edge
    def read_into(self, path, out, offset, fh):
        """read() into libfuse's reply buffer `out` (FUSE.read): no bytes object in between."""
        return self.fs.read_into(fh, out, offset)

    @_errno_edge
    def write(self, path, data, offset, fh):
        n = self.fs.write(fh, data, offset)
        if self._names:
            self._changed(self.fs.handle_ino(fh), None, fh)  # size, mtime, pages of other names
        return n

    @_errno_edge
    def truncate(self, path, length, fh=None):
        ino = self._ino(path, fh)
        self.fs.truncate(ino, length, fh)
        self._changed(ino, path if fh is None else None, fh)
        self._mark("setattr")  # (getattr)
        return 0

    @_errno_edge
    def flush(self, path, fh):
        self.fs.flush(fh)
        return 0

    @_errno_edge
    def fsync(self, path, datasync, fh):
        self.fs.fsync(fh)
        return 0

    @_errno_edge
    def fsyncdir(self, path, datasync, fh):
        self.fs.fsyncdir(self._ino(path, fh))
        return 0

    @_errno_edge
    def release(self, path, fh):
        ino = self.fs.handle_ino(fh)
        self.fs.release(fh)
        with self._hidden_lock:
            self._fh_paths.pop(fh, None)
            stale = [p for p, i in self._hidden.items() if i == ino] if self._hidden else []
        if stale and not self.fs.is_open(ino):
            # Normally libfuse unlinks the hidden path next; it cannot once the directory that
            # held it is gone, so an alias of a file nobody has open is dropped here.
            with self._hidden_lock:
                for p in stale:
                    self._hidden.pop(p, None)
        return 0


class FUSE(mfusepy.FUSE):
    """Reads go into libfuse's buffer (read). mfusepy drops rename's flags under libfuse 3; RENAME_NOREPLACE and RENAME_EXCHANGE must reach
    the namespace (`mv --exchange`, `renameat2`). It also drops the file handle that libfuse 3
    gives setattr's parts (truncate, chmod, chown, utimens) for ftruncate(2): without it an open
    file reached with no path (nullpath_ok) could not be truncated.

    Two of mfusepy's wrappers cost more than the request they carry, on every small file:
    create asks inspect.signature of the operation on every call (which of two signatures it
    has: ours is known), and getattr copies the attributes into the stat buffer by name lookups
    and string building per field; both are spelled out here for our one Operations."""

    def create(self, path: bytes, mode: int, fip) -> int:
        fi = fip.contents
        fi.fh = self.operations.create(path.decode(self.encoding, self.errors), mode, fi.flags)
        return 0

    def fgetattr(self, path: bytes | None, buf, fip) -> int:
        a = self.operations.getattr(self._path(path), fip.contents.fh if fip else None)
        ctypes.memset(buf, 0, _STAT_SIZE)
        st = buf.contents
        st.st_ino = a["st_ino"]
        st.st_mode = a["st_mode"]
        st.st_nlink = a["st_nlink"]
        st.st_uid = a["st_uid"]
        st.st_gid = a["st_gid"]
        st.st_size = a["st_size"]
        st.st_rdev = a["st_rdev"]
        st.st_blocks = a["st_blocks"]
        st.st_blksize = a["st_blksize"]
        for spec, t in (
            (st.st_atimespec, a["st_atime"]),
            (st.st_mtimespec, a["st_mtime"]),
            (st.st_ctimespec, a["st_ctime"]),
        ):
            spec.tv_sec, spec.tv_nsec = divmod(t, 1_000_000_000)
        return 0

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    @staticmethod
    def _fh(fip) -> int | None:
        return fip.contents.fh if fip else None

    def read(self, path: bytes | None, buf, size: int, offset: int, fip) -> int:
        """mfusepy's read takes a bytes object from the operation and copies it into libfuse's
        buffer; the operation here writes into that buffer itself (one copy less per MiB read,
        and none at all between the store's map and the reply for a raw block)."""
        out = memoryview((ctypes.c_ubyte * size).from_address(ctypes.addressof(buf.contents))).cast("B")
        return self.operations.read_into(self._path(path), out, offset, fip.contents.fh)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(self._path(old), self._path(new), flags)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip) -> int:
        return self.operations.truncate(self._path(path), length, self._fh(fip))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip) -> int:
        return self.operations.chmod(self._path(path), mode, self._fh(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip) -> int:
        if mfusepy.c_uid_t(uid + 1).value == 0:  # (uid_t)-1: leave unchanged
            uid = -1
        if mfusepy.c_gid_t(gid + 1).value == 0:
            gid = -1
        return self.operations.chown(self._path(path), uid, gid, self._fh(fip))

    def utimens_fuse_3(self, path: bytes | None, buf, fip) -> int:
        times = None
        if buf:
            times = (
                mfusepy.time_of_timespec(buf.contents.actime, use_ns=self.use_ns),
                mfusepy.time_of_timespec(buf.contents.modtime, use_ns=self.use_ns),
            )
        return self.operations.utimens(self._path(path), times, self._fh(fip))
