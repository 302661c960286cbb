"""The FUSE edge (mfusepy, libfuse 3): resolves paths, takes uid/gid from the caller's context, calls
the namespace, and turns its typed errors into errno. Nothing about what the filesystem *is* lives
here.

Threading: libfuse's multithreaded loop calls these methods from several threads at once; the
namespace is thread-safe, and this class keeps no state of its own.
"""
from __future__ import annotations

import errno
import functools
import logging
import os

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy  # noqa: E402  (reads FUSE_LIBRARY_NAME at import)
from mfusepy import FuseOSError  # noqa: E402

from . import namespace as ns  # noqa: E402
from .store import StoreError, StoreFull  # noqa: E402

log = logging.getLogger("llmfs")

ERRNO = {
    ns.NotFound: errno.ENOENT, ns.Exists: errno.EEXIST, ns.NotEmpty: errno.ENOTEMPTY,
    ns.NotADirectory: errno.ENOTDIR, ns.IsADirectory: errno.EISDIR,
    ns.InvalidArgument: errno.EINVAL, ns.NameTooLong: errno.ENAMETOOLONG,
    ns.NotPermitted: errno.EPERM, ns.NoAttribute: errno.ENODATA, ns.NotSupported: errno.ENOTSUP,
    ns.TooBig: errno.E2BIG, ns.NoSpace: errno.ENOSPC, ns.CorruptData: errno.EIO,
}
FUSE_UNKNOWN_INO = 0xFFFFFFFF
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


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


def _errno_edge(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except ns.FsError as e:
            raise FuseOSError(ERRNO[type(e)]) from None
        except StoreFull:
            raise FuseOSError(errno.ENOSPC) from None
        except StoreError as e:
            log.error("%s: %s", method.__name__, e)
            raise FuseOSError(errno.EIO) from None
    return wrapper


def _fs(path: str) -> bytes:
    return os.fsencode(path)


class Operations(mfusepy.Operations):
    use_ns = True  # integer-nanosecond times
    # Operations on open, unlinked files arrive with no path; we use the file handle.
    flag_nopath = True
    flag_nullpath_ok = True

    def __init__(self, fs: ns.Filesystem, on_ready=None, on_destroy=None):
        self.fs = fs
        self._on_ready = on_ready
        self._on_destroy = on_destroy

    # -- lifecycle -------------------------------------------------------------------------------
    def init(self, path):
        if self._on_ready:
            self._on_ready()

    def destroy(self, path):
        if self._on_destroy:
            self._on_destroy()

    # -- helpers ---------------------------------------------------------------------------------
    def _ino(self, path, fh=None) -> int:
        if fh is not None and path is None:
            return self.fs.handle_ino(fh)
        if path is None:
            raise ns.NotFound("no path")
        return self.fs.resolve(_fs(path))

    def _parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = _fs(path).rstrip(b"/").rpartition(b"/")
        return self.fs.resolve(head), name

    def _attrs(self, ino: int, inode) -> dict:
        blocks = -(-inode.size // 512) if inode.is_reg else 0
        return {
            "st_ino": ino, "st_mode": inode.mode, "st_nlink": inode.nlink,
            "st_uid": inode.uid, "st_gid": inode.gid, "st_size": inode.size,
            "st_atime": inode.atime, "st_mtime": inode.mtime, "st_ctime": inode.ctime,
            "st_rdev": inode.rdev, "st_blocks": blocks, "st_blksize": self.fs.block_size,
        }

    # -- metadata --------------------------------------------------------------------------------
    @_errno_edge
    def getattr(self, path, fh=None):
        ino = self.fs.handle_ino(fh) if fh is not None else self._ino(path)
        return self._attrs(ino, self.fs.getattr(ino))

    @_errno_edge
    def opendir(self, path):
        return self.fs.opendir(self._ino(path))

    @_errno_edge
    def readdir(self, path, fh):
        entries = self.fs.readdir(self._ino(path, fh))
        out = []
        for name, ino, mode in entries:
            if ino is None:  # '..'
                ino = self._parent(path)[0] if path not in (None, "/") else 1 if path else \
                    FUSE_UNKNOWN_INO
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
        self.fs.link(self._ino(source), parent, name)
        return 0

    @_errno_edge
    def unlink(self, path):
        self.fs.unlink(*self._parent(path))
        return 0

    @_errno_edge
    def rmdir(self, path):
        self.fs.rmdir(*self._parent(path))
        return 0

    @_errno_edge
    def rename(self, old, new, flags=0):
        op, oname = self._parent(old)
        np_, nname = self._parent(new)
        self.fs.rename(op, oname, np_, nname, flags)
        return 0

    @_errno_edge
    def chmod(self, path, mode):
        self.fs.chmod(self._ino(path), mode)
        return 0

    @_errno_edge
    def chown(self, path, uid, gid):
        self.fs.chown(self._ino(path), uid, gid)
        return 0

    @_errno_edge
    def utimens(self, path, times=None):
        if times is None:
            now = ns.now_ns()
            times = (now, now)

        def resolve(t):
            if t == UTIME_OMIT:
                return None
            return ns.now_ns() if t == UTIME_NOW else t
        self.fs.utimens(self._ino(path), resolve(times[0]), resolve(times[1]))
        return 0

    @_errno_edge
    def statfs(self, path):
        return self.fs.statfs()

    # -- xattrs ----------------------------------------------------------------------------------
    @_errno_edge
    def getxattr(self, path, name, position=0):
        return self.fs.getxattr(self._ino(path), _fs(name))

    @_errno_edge
    def setxattr(self, path, name, value, options, position=0):
        self.fs.setxattr(self._ino(path), _fs(name), value, options)
        return 0

    @_errno_edge
    def listxattr(self, path):
        return [os.fsdecode(n) for n in self.fs.listxattr(self._ino(path))]

    @_errno_edge
    def removexattr(self, path, name):
        self.fs.removexattr(self._ino(path), _fs(name))
        return 0

    # -- file data -------------------------------------------------------------------------------
    @_errno_edge
    def create(self, path, mode, flags):
        uid, gid, _ = mfusepy.fuse_get_context()
        parent, name = self._parent(path)
        return self.fs.create(parent, name, mode, flags, uid, gid)

    @_errno_edge
    def open(self, path, flags):
        uid, gid, pid = mfusepy.fuse_get_context()  # prefetch only what the opener may read
        return self.fs.open(self._ino(path), flags, uid, gid, _groups(pid))

    @_errno_edge
    def read(self, path, size, offset, fh):
        return self.fs.read(fh, size, offset)

    @_errno_edge
    def write(self, path, data, offset, fh):
        return self.fs.write(fh, data, offset)

    @_errno_edge
    def truncate(self, path, length, fh=None):
        self.fs.truncate(self._ino(path, fh), length, fh)
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
        self.fs.store.sync()
        return 0

    @_errno_edge
    def release(self, path, fh):
        self.fs.release(fh)
        return 0


class FUSE(mfusepy.FUSE):
    """mfusepy drops rename's flags under libfuse 3; RENAME_NOREPLACE and RENAME_EXCHANGE must reach
    the namespace (`mv --exchange`, `renameat2`)."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)
