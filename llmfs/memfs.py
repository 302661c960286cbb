"""The smallest in-memory filesystem on llmfs's FUSE binding (mfusepy + libfuse 3, multithreaded,
the same kernel options as an llmfs mount): the floor that `llmfs bench fs` measures llmfs's
small-file rates against in the same run. No store, no blocks: a dict of paths.

It mounts with llmfs's kernel options and readahead window (the INIT reply's max_readahead and,
as root, the mount's read_ahead_kb: llmfs/mount.py, READAHEAD), so that sequential reads through
it are the binding's floor for llmfs's reads too. It answers the same requests llmfs answers,
trivially: flush and fsync (which llmfs needs to
report a full disk at close), getxattr (the kernel asks for security.capability before every
write to a filesystem with xattrs). An operation left out would make the kernel stop sending that
request after its first ENOSYS, and the floor would then measure fewer round trips, not a faster
binding.

`python -m llmfs.memfs MOUNTPOINT` serves it in the foreground until unmounted.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import time

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy  # noqa: E402


class MemFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, mountpoint: str | None = None) -> None:
        """mountpoint: its real path, resolved before mounting (for raising its readahead)."""
        self.mountpoint = mountpoint
        now = time.time_ns()
        self.attrs = {
            "/": dict(
                st_mode=stat.S_IFDIR | 0o755,
                st_nlink=2,
                st_size=0,
                st_ino=1,
                st_atime=now,
                st_mtime=now,
                st_ctime=now,
            )
        }
        self.data: dict[str, bytearray] = {}
        self._mutex = threading.Lock()
        self.next_ino = 2

    def _new(self, path: str, mode: int) -> None:
        now = time.time_ns()
        with self._mutex:
            if path in self.attrs:
                raise mfusepy.FuseOSError(errno.EEXIST)
            self.attrs[path] = dict(
                st_mode=mode,
                st_nlink=1,
                st_size=0,
                st_ino=self.next_ino,
                st_atime=now,
                st_mtime=now,
                st_ctime=now,
            )
            self.next_ino += 1

    def init_with_config(self, conn, config):
        from .mount import READAHEAD, raise_readahead
        from .mounts import read_mountinfo

        if conn is not None:
            conn.max_readahead = READAHEAD
        if self.mountpoint is not None:  # the mount is listed by now (no stat of it: INIT is
            # not answered yet, so a request to this mount would wait for ever)
            devs = [e.dev for e in read_mountinfo() if e.target == self.mountpoint and e.source == "memfs"]
            if devs:
                raise_readahead(devs[-1], READAHEAD)

    def getattr(self, path, fh=None):
        try:
            return self.attrs[path]
        except KeyError:
            raise mfusepy.FuseOSError(errno.ENOENT) from None

    def readdir(self, path, fh):
        prefix = path.rstrip("/") + "/"
        return [".", ".."] + [
            p[len(prefix) :]
            for p in list(self.attrs)
            if p.startswith(prefix) and "/" not in p[len(prefix) :] and p != "/"
        ]

    def mkdir(self, path, mode):
        self._new(path, stat.S_IFDIR | mode)

    def create(self, path, mode, flags):
        self._new(path, stat.S_IFREG | mode)
        self.data[path] = bytearray()
        return 0

    def open(self, path, flags):
        return 0

    def read(self, path, size, offset, fh):
        return bytes(self.data[path][offset : offset + size])

    def write(self, path, buf, offset, fh):
        d = self.data[path]
        d[offset : offset + len(buf)] = buf
        self.attrs[path]["st_size"] = len(d)
        return len(buf)

    def truncate(self, path, length, fh=None):
        d = self.data[path]
        del d[length:]
        d.extend(bytes(length - len(d)))
        self.attrs[path]["st_size"] = length

    def unlink(self, path):
        self.attrs.pop(path)
        self.data.pop(path, None)

    def rmdir(self, path):
        self.attrs.pop(path)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        return 0

    def release(self, path, fh):
        return 0

    def getxattr(self, path, name, position=0):
        raise mfusepy.FuseOSError(errno.ENODATA)

    def listxattr(self, path):
        return []

    def utimens(self, path, times=None):
        return 0

    def chmod(self, path, mode):
        a = self.attrs[path]
        a["st_mode"] = stat.S_IFMT(a["st_mode"]) | mode

    def statfs(self, path):
        return dict(
            f_bsize=4096, f_frsize=4096, f_blocks=1 << 20, f_bfree=1 << 20, f_bavail=1 << 20, f_namemax=255
        )


def main() -> None:
    from .mount import BASE_OPTIONS

    mfusepy.FUSE(
        MemFS(os.path.realpath(sys.argv[1])),
        sys.argv[1],
        foreground=True,
        nothreads=False,
        fsname="memfs",
        **BASE_OPTIONS,
    )


if __name__ == "__main__":
    main()
