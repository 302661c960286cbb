"""The namespace: what the filesystem *is* — inodes, directory entries, links, file data in blocks,
xattrs — independent of FUSE. The FUSE edge (fuseops.py) resolves paths and translates; this module
holds POSIX semantics and raises typed FsError subclasses, which only the edge turns into errno.

File data: a file is a sequence of fixed logical blocks (the store's block size). Writes land in a
per-file dirty buffer of whole blocks and reach the store in one write transaction per flush (blocks,
refcounts, block map, size, times together), on fsync, flush (close), release, truncate and when all
files' dirty bytes pass `dirty_limit`. Identical blocks are stored once; all-zero blocks are holes.

Threading: FUSE calls arrive on many threads. `self._lock` guards the table of open files and every
metadata change that must be checked and applied atomically (link counts, names). Each open file
has its own lock for its data. Lock order: a file's lock, then `self._lock`, then the store's write
lock; never the other way round. Decoding (zstd now, the LM later) runs outside all locks, on
containers read in one LMDB snapshot, so a slow decode never blocks other files or metadata.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from llmfs.codec import ContainerError
from llmfs.codec.registry import CODEC_NAMES, LM, RAW, ZSTD, Registry, peek_header

from .store import ROOT_INO, Inode, Store, StoreFull, block_hash, now_ns

log = logging.getLogger("llmfs")

NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
VIRTUAL_XATTR = b"user.llmfs."
# Flush a file once all files' dirty bytes pass this: bounds the daemon's memory for buffered writes.
DIRTY_LIMIT = 64 << 20
# Opening an LM-coded file at most this fraction of the cache's RAM budget prefetches all of it:
# prefetched blocks enter the 2Q first stage, a quarter of RAM (cache/policy.py).
HOT_FILE_FRACTION = 0.25
# A reader walking a directory in name order (cache/readahead.py) gets the LM blocks of the next
# small files (at most this many blocks each) decoded in one batch with the file it opens: up to
# this many blocks — the prefetcher's batch — from at most DIR_PREFETCH_FILES files.
DIR_PREFETCH_BLOCKS = 16
DIR_PREFETCH_FILES = 64
# Where each recently looked-up inode was found (parent, name): open() only gets the inode.
LOOKUPS_KEPT = 4096


class FsError(Exception):
    """A filesystem operation failed in a way POSIX names (the edge maps the class to errno)."""


class NotFound(FsError): pass
class Exists(FsError): pass
class NotEmpty(FsError): pass
class NotADirectory(FsError): pass
class IsADirectory(FsError): pass
class InvalidArgument(FsError): pass
class NameTooLong(FsError): pass
class NotPermitted(FsError): pass
class NoAttribute(FsError): pass
class NotSupported(FsError): pass
class TooBig(FsError): pass
class NoSpace(FsError): pass


class CorruptData(FsError):
    """A stored block failed its checksum or could not be decoded: the read fails (EIO), it never
    returns wrong bytes."""


@dataclass
class OpenFile:
    """In-memory state of a file that is open or being changed: pinned while `users` > 0."""
    ino: int
    size: int
    users: int = 0
    dirty: dict = field(default_factory=dict)  # block index -> bytearray(block_size)
    mtime: int | None = None  # set when data changed since the last flush
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Handle:
    ino: int
    flags: int


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(name)
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidArgument(name)


class Filesystem:
    def __init__(self, store: Store, registry: Registry, cache=None, dirty_limit: int = DIRTY_LIMIT,
                 codecs=(ZSTD,), readahead=None):
        self.store = store
        self.registry = registry
        self.cache = cache  # decoded blocks by hash (cache.DecodeCache); None = no cache
        # readahead: cache.Readahead, which blocks a sequential reader wants next (None = off)
        self.block_size = store.block_size
        self.dirty_limit = dirty_limit
        self.codecs = codecs
        self._lock = threading.RLock()
        self._files: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._dirty_bytes = 0
        self.readahead = readahead
        self._found: OrderedDict[int, tuple[int, bytes]] = OrderedDict()  # ino -> (parent, name)
        self._found_lock = threading.Lock()  # not self._lock: that one is held across store writes

    # ------------------------------------------------------------------ attributes and lookup
    def lookup(self, parent: int, name: bytes) -> int:
        with self.store.read() as t:
            ino = self._lookup(t, parent, name)
        self._remember(ino, parent, name)
        return ino

    def _remember(self, ino: int, parent: int, name: bytes) -> None:
        """Where ino was found: open() gets only the inode, and its directory tells readahead
        which files a directory walk opens next."""
        if self.readahead is None or name in (b".", b".."):
            return
        with self._found_lock:
            self._found[ino] = (parent, name)
            self._found.move_to_end(ino)
            if len(self._found) > LOOKUPS_KEPT:
                self._found.popitem(last=False)

    def _lookup(self, t, parent: int, name: bytes) -> int:
        if len(name) > NAME_MAX:
            raise NameTooLong(name)  # no such name can exist: say why, not ENOENT
        if name == b".":
            return parent
        pinode = t.inode(parent)
        if pinode is None:
            raise NotFound(parent)
        if not pinode.is_dir:
            raise NotADirectory(parent)
        ino = t.lookup(parent, name)
        if ino is None:
            raise NotFound(name)
        return ino

    def resolve(self, path: bytes) -> int:
        """Inode of an absolute path (no symlinks followed: the kernel does that)."""
        ino, parent, name = ROOT_INO, None, b""
        with self.store.read() as t:
            for part in path.split(b"/"):
                if part:
                    parent, name = ino, part
                    ino = self._lookup(t, ino, part)
        if parent is not None:
            self._remember(ino, parent, name)
        return ino

    def getattr(self, ino: int) -> Inode:
        """The inode, with the size and mtime of unflushed writes applied."""
        with self.store.read() as t:
            inode = t.inode(ino)
        if inode is None:
            raise NotFound(ino)
        f = self._files.get(ino)
        if f is not None:
            changes = {"size": f.size}
            if f.mtime is not None:
                changes.update(mtime=f.mtime, ctime=max(f.mtime, inode.ctime))
            inode = inode.evolve(**changes)
        return inode

    def readdir(self, ino: int) -> list[tuple[bytes, int, int]]:
        """(name, ino, mode) of each entry, '.' and '..' first ('..' with ino None: directories
        keep no parent pointer; the caller knows the path)."""
        with self.store.read() as t:
            inode = t.inode(ino)
            if inode is None:
                raise NotFound(ino)
            if not inode.is_dir:
                raise NotADirectory(ino)
            out = [(b".", ino, inode.mode), (b"..", None, stat.S_IFDIR)]
            for name, child in t.listdir(ino):
                cinode = t.inode(child)
                out.append((name, child, cinode.mode if cinode else 0))
        return out

    # ------------------------------------------------------------------ creating names
    def _new_inode(self, t, parent: int, name: bytes, mode: int, uid: int, gid: int,
                   rdev: int = 0, target: bytes = b"") -> tuple[int, Inode]:
        _check_name(name)
        pinode = t.inode(parent)
        if pinode is None:
            raise NotFound(parent)
        if not pinode.is_dir:
            raise NotADirectory(parent)
        if pinode.nlink == 0:
            raise NotFound(parent)  # a removed directory that is still someone's cwd
        if t.lookup(parent, name) is not None:
            raise Exists(name)
        if pinode.mode & stat.S_ISGID:  # BSD group semantics of setgid directories
            gid = pinode.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = now_ns()
        is_dir = stat.S_ISDIR(mode)
        inode = Inode(mode, uid, gid, 2 if is_dir else 1, len(target), now, now, now, rdev, target)
        ino = t.next_ino()
        t.put_inode(ino, inode)
        t.link(parent, name, ino)
        t.put_inode(parent, pinode.evolve(nlink=pinode.nlink + (1 if is_dir else 0),
                                          mtime=now, ctime=now))
        return ino, inode

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> int:
        with self._lock, self.store.write() as t:
            return self._new_inode(t, parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)[0]

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> int:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise InvalidArgument(mode)
        with self._lock, self.store.write() as t:
            return self._new_inode(t, parent, name, mode, uid, gid, rdev=rdev)[0]

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> int:
        if len(target) > 4095:
            raise NameTooLong(target)
        with self._lock, self.store.write() as t:
            return self._new_inode(t, parent, name, stat.S_IFLNK | 0o777, uid, gid,
                                   target=target)[0]

    def readlink(self, ino: int) -> bytes:
        inode = self.getattr(ino)
        if not stat.S_ISLNK(inode.mode):
            raise InvalidArgument(ino)
        return inode.target

    def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int) -> int:
        """Create (or with no O_EXCL, open an existing) regular file; returns a file handle."""
        with self._lock:
            with self.store.write() as t:
                existing = t.lookup(parent, name) if t.inode(parent) else None
                if existing is None:
                    ino = self._new_inode(t, parent, name, stat.S_IFREG | (mode & 0o7777),
                                          uid, gid)[0]
            if existing is not None:
                if flags & os.O_EXCL:
                    raise Exists(name)
                return self.open(existing, flags)
            return self._open_handle(ino, flags)

    def link(self, ino: int, parent: int, name: bytes) -> None:
        with self._lock, self.store.write() as t:
            inode = t.inode(ino)
            if inode is None:
                raise NotFound(ino)
            if inode.is_dir:
                raise NotPermitted("hard links to directories")
            _check_name(name)
            pinode = t.inode(parent)
            if pinode is None or pinode.nlink == 0:
                raise NotFound(parent)
            if not pinode.is_dir:
                raise NotADirectory(parent)
            if t.lookup(parent, name) is not None:
                raise Exists(name)
            now = now_ns()
            t.link(parent, name, ino)
            if inode.nlink == 0:  # linkat() of an open, unlinked file (O_TMPFILE style)
                t.remove_orphan(ino)
            t.put_inode(ino, inode.evolve(nlink=inode.nlink + 1, ctime=now), inode)
            t.put_inode(parent, pinode.evolve(mtime=now, ctime=now))

    # ------------------------------------------------------------------ removing names
    def _drop_link(self, t, ino: int, inode: Inode, now: int) -> None:
        """One name of `ino` is gone: delete it, or keep it as an orphan while it is open."""
        nlink = 0 if inode.is_dir else inode.nlink - 1
        if nlink > 0:
            t.put_inode(ino, inode.evolve(nlink=nlink, ctime=now), inode)
        elif ino in self._files:
            t.put_inode(ino, inode.evolve(nlink=0, ctime=now), inode)
            t.add_orphan(ino)
        else:
            t.delete_inode(ino)

    def unlink(self, parent: int, name: bytes) -> None:
        with self._lock, self.store.write() as t:
            ino = self._lookup(t, parent, name)
            inode = t.inode(ino)
            if inode.is_dir:
                raise IsADirectory(name)
            now = now_ns()
            t.unlink(parent, name)
            self._drop_link(t, ino, inode, now)
            pinode = t.inode(parent)
            t.put_inode(parent, pinode.evolve(mtime=now, ctime=now))

    def rmdir(self, parent: int, name: bytes) -> None:
        if name == b".":
            raise InvalidArgument(name)
        with self._lock, self.store.write() as t:
            ino = self._lookup(t, parent, name)
            inode = t.inode(ino)
            if not inode.is_dir:
                raise NotADirectory(name)
            if not t.is_empty_dir(ino):
                raise NotEmpty(name)
            now = now_ns()
            t.unlink(parent, name)
            self._drop_link(t, ino, inode, now)
            pinode = t.inode(parent)
            t.put_inode(parent, pinode.evolve(nlink=pinode.nlink - 1, mtime=now, ctime=now))

    def rename(self, old_parent: int, old: bytes, new_parent: int, new: bytes,
               flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (RENAME_NOREPLACE |
                                                                        RENAME_EXCHANGE):
            raise InvalidArgument(flags)
        _check_name(new)
        with self._lock, self.store.write() as t:
            src = self._lookup(t, old_parent, old)
            sinode = t.inode(src)
            npinode = t.inode(new_parent)
            if npinode is None or npinode.nlink == 0:
                raise NotFound(new_parent)
            if not npinode.is_dir:
                raise NotADirectory(new_parent)
            dst = t.lookup(new_parent, new)
            if dst == src:
                return  # same inode (hard links or the same name): POSIX says do nothing
            now = now_ns()
            dir_moves = sinode.is_dir and old_parent != new_parent
            if sinode.is_dir and self._is_ancestor(t, src, new_parent):
                raise InvalidArgument("cannot move a directory into itself")
            if dst is not None:
                dinode = t.inode(dst)
                if flags & RENAME_NOREPLACE:
                    raise Exists(new)
                if flags & RENAME_EXCHANGE:
                    if dinode.is_dir and old_parent != new_parent and \
                            self._is_ancestor(t, dst, old_parent):
                        raise InvalidArgument("cannot move a directory into itself")
                    t.link(old_parent, old, dst)
                    t.link(new_parent, new, src)
                    if sinode.is_dir != dinode.is_dir and old_parent != new_parent:
                        delta = 1 if sinode.is_dir else -1  # a directory moves to new_parent
                        op, np_ = t.inode(old_parent), t.inode(new_parent)
                        t.put_inode(old_parent, op.evolve(nlink=op.nlink - delta))
                        t.put_inode(new_parent, np_.evolve(nlink=np_.nlink + delta))
                    for ino in {src, dst}:
                        i = t.inode(ino)
                        t.put_inode(ino, i.evolve(ctime=now), i)
                    self._touch_dirs(t, {old_parent, new_parent}, now)
                    return
                if sinode.is_dir:
                    if not dinode.is_dir:
                        raise NotADirectory(new)
                    if not t.is_empty_dir(dst):
                        raise NotEmpty(new)
                elif dinode.is_dir:
                    raise IsADirectory(new)
                t.unlink(new_parent, new)
                self._drop_link(t, dst, dinode, now)
                if dinode.is_dir:
                    np_ = t.inode(new_parent)
                    t.put_inode(new_parent, np_.evolve(nlink=np_.nlink - 1))
            elif flags & RENAME_EXCHANGE:
                raise NotFound(new)
            t.unlink(old_parent, old)
            t.link(new_parent, new, src)
            t.put_inode(src, sinode.evolve(ctime=now), sinode)
            if dir_moves:
                op, np_ = t.inode(old_parent), t.inode(new_parent)
                t.put_inode(old_parent, op.evolve(nlink=op.nlink - 1))
                t.put_inode(new_parent, np_.evolve(nlink=np_.nlink + 1))
            self._touch_dirs(t, {old_parent, new_parent}, now)

    @staticmethod
    def _touch_dirs(t, inos, now: int) -> None:
        for ino in inos:
            i = t.inode(ino)
            t.put_inode(ino, i.evolve(mtime=now, ctime=now))

    @staticmethod
    def _is_ancestor(t, ancestor: int, ino: int) -> bool:
        """Whether directory `ancestor` is `ino` or above it. Directories keep no parent pointer,
        so this searches from `ancestor` down; only renames of directories across parents pay."""
        if ancestor == ino:
            return True
        stack = [ancestor]
        while stack:
            d = stack.pop()
            for _, child in t.listdir(d):
                if child == ino:
                    return True
                ci = t.inode(child)
                if ci is not None and ci.is_dir:
                    stack.append(child)
        return False

    # ------------------------------------------------------------------ attributes
    def _update_inode(self, ino: int, **changes) -> None:
        with self._lock, self.store.write() as t:
            inode = t.inode(ino)
            if inode is None:
                raise NotFound(ino)
            t.put_inode(ino, inode.evolve(ctime=now_ns(), **changes), inode)

    def chmod(self, ino: int, mode: int) -> None:
        with self.store.read() as t:
            inode = t.inode(ino)
        if inode is None:
            raise NotFound(ino)
        self._update_inode(ino, mode=stat.S_IFMT(inode.mode) | (mode & 0o7777))

    def chown(self, ino: int, uid: int, gid: int) -> None:
        inode = self.getattr(ino)
        changes = {}
        if uid != -1 and uid != 0xFFFFFFFF:
            changes["uid"] = uid
        if gid != -1 and gid != 0xFFFFFFFF:
            changes["gid"] = gid
        if changes and not inode.is_dir and inode.mode & 0o111:
            # chown clears set-user/group-id bits of executables, as on every POSIX filesystem
            changes["mode"] = inode.mode & ~(stat.S_ISUID | stat.S_ISGID)
        self._update_inode(ino, **changes)

    def utimens(self, ino: int, atime: int | None, mtime: int | None) -> None:
        """Times in ns; None leaves that time as it is."""
        changes = {}
        if atime is not None:
            changes["atime"] = atime
        if mtime is not None:
            changes["mtime"] = mtime
        f = self._files.get(ino)
        if f is not None and mtime is not None:
            with f.lock:
                self._flush_locked(f)  # a later flush must not overwrite the mtime set here
        self._update_inode(ino, **changes)

    # ------------------------------------------------------------------ xattrs
    def _virtual_xattr(self, ino: int, name: bytes) -> bytes:
        """user.llmfs.codec ("lm", "zstd", "raw", a mix like "lm:3,zstd:1", or "none"),
        user.llmfs.stored_size (bytes of the file's blocks in the store), and on the root
        user.llmfs.cache (the decode cache's metrics, JSON). Readable by name, not listed — so
        cp -a and rsync -X do not copy them as ordinary attributes."""
        if name == VIRTUAL_XATTR + b"cache" and ino == ROOT_INO:
            metrics = self.cache.metrics() if hasattr(self.cache, "metrics") else {}
            return json.dumps(metrics, sort_keys=True).encode()
        f = self._files.get(ino)
        if f is not None:
            with f.lock:
                self._flush_locked(f)  # describe what the file holds, not what it held
        with self.store.read() as t:
            if t.inode(ino) is None:
                raise NotFound(ino)
            counts: dict[str, int] = {}
            stored = 0
            for h in t.block_hashes(ino, 0, (1 << 64) - 1).values():
                blob = t.container(h)
                stored += len(blob)
                cname = CODEC_NAMES.get(peek_header(blob[:64]).codec_id, "?")
                counts[cname] = counts.get(cname, 0) + 1
        if name == VIRTUAL_XATTR + b"stored_size":
            return str(stored).encode()
        if name == VIRTUAL_XATTR + b"codec":
            if len(counts) == 1:
                return next(iter(counts)).encode()
            return (",".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "none").encode()
        raise NoAttribute(name)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if name.startswith(VIRTUAL_XATTR):
            return self._virtual_xattr(ino, name)
        with self.store.read() as t:
            if t.inode(ino) is None:
                raise NotFound(ino)
            value = t.xattr(ino, name)
        if value is None:
            raise NoAttribute(name)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        with self.store.read() as t:
            if t.inode(ino) is None:
                raise NotFound(ino)
            return t.xattr_names(ino)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if name.startswith(b"system."):
            raise NotSupported("POSIX ACLs and other system.* attributes are not supported")
        if name.startswith(VIRTUAL_XATTR):
            raise NotPermitted("user.llmfs.* attributes describe storage; they cannot be set")
        if len(name) > 255 or not name:
            raise NameTooLong(name) if name else InvalidArgument(name)
        if len(value) > XATTR_SIZE_MAX:
            raise TooBig(name)
        with self._lock, self.store.write() as t:
            inode = t.inode(ino)
            if inode is None:
                raise NotFound(ino)
            exists = t.xattr(ino, name) is not None
            if flags & XATTR_CREATE and exists:
                raise Exists(name)
            if flags & XATTR_REPLACE and not exists:
                raise NoAttribute(name)
            t.set_xattr(ino, name, value)
            t.put_inode(ino, inode.evolve(ctime=now_ns()), inode)

    def removexattr(self, ino: int, name: bytes) -> None:
        with self._lock, self.store.write() as t:
            inode = t.inode(ino)
            if inode is None:
                raise NotFound(ino)
            if not t.remove_xattr(ino, name):
                raise NoAttribute(name)
            t.put_inode(ino, inode.evolve(ctime=now_ns()), inode)

    # ------------------------------------------------------------------ open files
    def _pin(self, ino: int) -> OpenFile:
        with self._lock:
            f = self._files.get(ino)
            if f is None:
                with self.store.read() as t:
                    inode = t.inode(ino)
                if inode is None:
                    raise NotFound(ino)
                f = self._files[ino] = OpenFile(ino, inode.size)
            f.users += 1
            return f

    def _unpin(self, f: OpenFile) -> None:
        with f.lock:
            self._flush_locked(f)
        with self._lock:
            f.users -= 1
            if f.users:
                return
            del self._files[f.ino]
            if self.readahead is not None:
                self.readahead.forget(f.ino)
            with self.store.write() as t:
                inode = t.inode(f.ino)
                if inode is not None and inode.nlink == 0:
                    t.delete_inode(f.ino)  # the last user of an unlinked file is gone

    def _open_handle(self, ino: int, flags: int) -> int:
        f = self._pin(ino)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(ino, flags)
        if flags & os.O_TRUNC:
            # Linux truncates even with O_RDONLY (the kernel checked write permission), and with
            # atomic_o_trunc (libfuse 3's default) it leaves the truncation to open.
            with f.lock:
                self._truncate_locked(f, 0)
        return fh

    def open(self, ino: int, flags: int) -> int:
        inode = self.getattr(ino)
        if inode.is_dir and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise IsADirectory(ino)
        fh = self._open_handle(ino, flags)
        if inode.is_reg:
            self._prefetch_on_open(ino, inode)
        return fh

    def _prefetch_on_open(self, ino: int, inode: Inode) -> None:
        """A hot file (at most HOT_FILE_FRACTION of the cache's RAM): all its LM blocks, decoded
        as one batch ahead of the reader; larger files would be evicted from the cache's first
        stage before they are read, so they get readahead only. If the reader walks the file's
        directory in name order, the LM blocks of the next hot files join the same batch."""
        if self.cache is None or not hasattr(self.cache, "prefetch"):
            return
        hot = getattr(self.cache, "ram_budget", 0) * HOT_FILE_FRACTION
        with self._found_lock:
            where = self._found.get(ino)
        small = min(hot, DIR_PREFETCH_BLOCKS * self.block_size)  # siblings: small files only
        with self.store.read(buffers=True) as t:  # headers only: no 64 KiB copies
            start = None
            if where is not None:
                start = self.readahead.open_in_dir(
                    *where, lambda after: self._next_file(t, where[0], after))
            hashes = self._lm_hashes(t, ino, inode.size) if 0 < inode.size <= hot else []
            if start is not None:
                names = []
                for name, child in t.listdir(where[0], after=start):
                    if len(hashes) >= DIR_PREFETCH_BLOCKS or len(names) >= DIR_PREFETCH_FILES:
                        break
                    names.append(name)
                    sibling = t.inode(child)      # a big one gets readahead when read
                    if sibling is not None and sibling.is_reg and 0 < sibling.size <= small:
                        hashes += self._lm_hashes(t, child, sibling.size)
                self.readahead.named_files(where[0], names)
        if hashes:
            self.cache.prefetch(hashes, self._decode_hashes)

    @staticmethod
    def _next_file(t, parent: int, after: bytes) -> bytes | None:
        """The name of the next regular file after `after` in directory parent (None if none
        among the next DIR_PREFETCH_FILES entries: a walk is not worth a long scan)."""
        for k, (name, child) in enumerate(t.listdir(parent, after=after)):
            if k >= DIR_PREFETCH_FILES:
                break
            inode = t.inode(child)
            if inode is not None and inode.is_reg:
                return name
        return None

    def _lm_hashes(self, t, ino: int, size: int, indices=None) -> list[bytes]:
        """Hashes of the LM-coded blocks of a file (of the given block indices, else all)."""
        if indices is None:
            indices = range(-(-size // self.block_size))
        if not indices:
            return []
        wanted = set(indices)
        return [h for i, h in t.block_hashes(ino, min(wanted), max(wanted)).items()
                if i in wanted and t.container_codec(h) == LM]

    def opendir(self, ino: int) -> int:
        if not self.getattr(ino).is_dir:
            raise NotADirectory(ino)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(ino, os.O_RDONLY | os.O_DIRECTORY)
        return fh

    def releasedir(self, fh: int) -> None:
        with self._lock:
            self._handles.pop(fh, None)

    def is_open(self, ino: int) -> bool:
        """Whether a handle (or an internal user) has the file pinned."""
        return ino in self._files

    def handle_ino(self, fh: int) -> int:
        try:
            return self._handles[fh].ino
        except KeyError:
            raise InvalidArgument(f"bad file handle {fh}") from None

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
        if h is not None:
            self._unpin(self._files[h.ino])

    def flush(self, fh: int) -> None:
        f = self._files[self.handle_ino(fh)]
        with f.lock:
            self._flush_locked(f)

    def fsync(self, fh: int | None, ino: int | None = None) -> None:
        ino = self.handle_ino(fh) if fh is not None else ino
        f = self._files.get(ino)
        if f is not None:
            with f.lock:
                self._flush_locked(f)
        self.store.sync()

    def flush_all(self) -> None:
        for f in list(self._files.values()):
            with f.lock:
                self._flush_locked(f)
        self.store.sync()

    # ------------------------------------------------------------------ file data
    def _containers(self, ino: int, first: int, last: int) -> dict[int, tuple[bytes, bytes]]:
        """{index: (hash, container)} of the mapped blocks in [first, last], one snapshot."""
        with self.store.read() as t:
            hashes = t.block_hashes(ino, first, last)
            return {i: (h, t.container(h)) for i, h in hashes.items()}

    def _decode(self, ino: int, blocks: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Plaintext of blocks {index: (hash, container)}: cached ones from the cache, the rest
        decoded as one batch (single-flight: a block another reader or the prefetcher is
        decoding is waited for, not decoded twice)."""
        if not blocks:
            return {}
        by_hash = {h: blob for h, blob in blocks.values()}

        def decode(hashes: list[bytes]) -> list[bytes]:
            if any(by_hash[h] is None for h in hashes):
                raise ContainerError("block map names a block that is not in the store")
            return self.registry.decode_many([by_hash[h] for h in hashes])
        order = sorted(blocks)
        try:
            if self.cache is None:
                plain = decode([blocks[i][0] for i in order])
            else:
                plain = self.cache.get_many([blocks[i][0] for i in order], decode)
        except ContainerError as e:
            log.error("inode %d: block(s) %s unreadable: %s (run `llmfs fsck`)", ino,
                      ",".join(map(str, order)), e)
            raise CorruptData(str(e)) from None
        return dict(zip(order, plain))

    def _decode_hashes(self, hashes: list[bytes]) -> list[bytes]:
        """The prefetcher's decode: containers read now, in one snapshot, decoded as one batch.
        Always this bound method, so the prefetcher can batch keys from different requests."""
        with self.store.read() as t:
            blobs = [t.container(h) for h in hashes]
        if any(b is None for b in blobs):
            raise ContainerError("a block to prefetch is no longer stored")
        return self.registry.decode_many(blobs)

    def _prefetch(self, ino: int, indices) -> None:
        """Decode these blocks of a file in the background if they are LM-coded (zstd and raw
        blocks decode faster than a prefetch could help)."""
        if self.cache is None or not hasattr(self.cache, "prefetch") or not indices:
            return
        with self.store.read(buffers=True) as t:  # headers only: no 64 KiB copies
            hashes = self._lm_hashes(t, ino, 0, indices)
        if hashes:
            self.cache.prefetch(hashes, self._decode_hashes)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        f = self._files[self.handle_ino(fh)]
        return self._read(f, size, offset)

    def read_ino(self, ino: int, size: int, offset: int) -> bytes:
        f = self._pin(ino)
        try:
            return self._read(f, size, offset)
        finally:
            self._unpin(f)

    def _read(self, f: OpenFile, size: int, offset: int) -> bytes:
        bs = self.block_size
        with f.lock:  # a consistent view: dirty blocks + the store snapshot for the rest
            end = min(offset + size, f.size)
            if offset >= end:
                return b""
            first, last = offset // bs, (end - 1) // bs
            dirty = {i: bytes(f.dirty[i]) for i in range(first, last + 1) if i in f.dirty}
            stored = self._containers(f.ino, first, last) if len(dirty) < last - first + 1 else {}
        for i in dirty:
            stored.pop(i, None)
        if self.readahead is not None:
            nblocks = -(-f.size // bs)
            self._prefetch(f.ino, self.readahead.access(f.ino, first, last, nblocks))
        plain = self._decode(f.ino, stored)
        parts = []
        for i in range(first, last + 1):
            block = dirty.get(i)
            if block is None:
                block = plain.get(i, b"")
            lo = offset - i * bs if i == first else 0
            hi = end - i * bs if i == last else bs
            chunk = block[lo:hi]
            if len(chunk) < hi - lo:  # a hole or a short last block: zeros
                chunk = chunk + bytes(hi - lo - len(chunk))
            parts.append(chunk)
        return b"".join(parts)

    def _load_block(self, f: OpenFile, idx: int) -> bytearray:
        """The dirty buffer of block idx, loaded from the store on first touch (lock held)."""
        buf = f.dirty.get(idx)
        if buf is None:
            buf = bytearray(self.block_size)
            if idx * self.block_size < f.size:
                plain = self._decode(f.ino, self._containers(f.ino, idx, idx)).get(idx)
                if plain:
                    buf[:len(plain)] = plain
            f.dirty[idx] = buf
            self._dirty_bytes += self.block_size
        return buf

    def write(self, fh: int, data: bytes, offset: int) -> int:
        h = self._handles.get(fh)
        if h is None:
            raise InvalidArgument(f"bad file handle {fh}")
        f = self._files[h.ino]
        bs = self.block_size
        with f.lock:
            if self._dirty_bytes + len(data) > self.dirty_limit and f.dirty:
                # Flush before taking the new data: if the disk is full this write fails whole
                # (ENOSPC) and the bytes already accepted stay buffered for a later flush.
                self._flush_locked(f)
            if h.flags & os.O_APPEND:
                offset = f.size
            pos, view = offset, memoryview(data)
            while view:
                idx, lo = divmod(pos, bs)
                n = min(bs - lo, len(view))
                if n == bs and idx not in f.dirty:  # a whole block: nothing to read first
                    f.dirty[idx] = bytearray(view[:n])
                    self._dirty_bytes += bs
                else:
                    self._load_block(f, idx)[lo:lo + n] = view[:n]
                pos += n
                view = view[n:]
            f.size = max(f.size, offset + len(data))
            f.mtime = now_ns()
        return len(data)

    def truncate(self, ino: int, length: int, fh: int | None = None) -> None:
        if length < 0:
            raise InvalidArgument(length)
        inode = self.getattr(ino)
        if inode.is_dir:
            raise IsADirectory(ino)
        if not inode.is_reg:
            raise InvalidArgument(ino)
        f = self._pin(ino)
        try:
            with f.lock:
                self._truncate_locked(f, length)
        finally:
            self._unpin(f)

    def _truncate_locked(self, f: OpenFile, length: int) -> None:
        bs = self.block_size
        if length < f.size:
            idx, lo = divmod(length, bs)
            if lo:  # the bytes past the new end of the last block must read as zeros later
                self._load_block(f, idx)[lo:] = bytes(bs - lo)
            for i in [i for i in f.dirty if i * bs >= length]:
                del f.dirty[i]
                self._dirty_bytes -= bs
        f.size = length
        f.mtime = now_ns()
        self._flush_locked(f)

    def _flush_locked(self, f: OpenFile) -> None:
        """Write f's dirty blocks, its size and mtime in one transaction (f.lock held)."""
        if not f.dirty and f.mtime is None:
            return
        bs = self.block_size
        blocks = {}  # idx -> (hash, plain) ; hash None = hole
        for idx, buf in f.dirty.items():
            n = min(bs, f.size - idx * bs)
            if n <= 0:
                continue
            plain = bytes(buf[:n])
            if not plain.strip(b"\0"):
                blocks[idx] = (None, b"")
            else:
                blocks[idx] = (block_hash(plain), plain)
        with self.store.read() as t:
            known = {h for h, _ in blocks.values() if h is not None and t.refcount(h)}
        encoded = {}
        for h, plain in blocks.values():  # compress outside the write transaction
            if h is not None and h not in known and h not in encoded:
                encoded[h] = self._encode(plain)
        try:
            with self.store.write() as t:
                for idx, (h, plain) in sorted(blocks.items()):
                    blob = encoded.get(h)
                    if h is not None and blob is None and not t.refcount(h):
                        blob = encoded[h] = self._encode(plain)  # deleted since we looked
                    codec_id = self.registry.header(blob).codec_id if blob else RAW
                    t.set_block(f.ino, idx, h, blob, codec_id, len(plain),
                                pending=blob is not None and codec_id != RAW)
                t.truncate_blocks(f.ino, -(-f.size // bs))
                inode = t.inode(f.ino)
                if inode is None:
                    raise NotFound(f.ino)
                changes = {"size": f.size}
                if f.mtime is not None:
                    changes.update(mtime=f.mtime, ctime=max(f.mtime, inode.ctime))
                t.put_inode(f.ino, inode.evolve(**changes), inode)
        except StoreFull as e:
            raise NoSpace(str(e)) from None  # the dirty data stays buffered: nothing is lost
        self._dirty_bytes -= bs * len(f.dirty)
        f.dirty.clear()
        f.mtime = None

    def _encode(self, plain: bytes) -> bytes:
        return self.registry.encode(plain, self.codecs)

    # ------------------------------------------------------------------ whole filesystem
    def statfs(self) -> dict:
        with self.store.read() as t:
            counters = t.counters
            n_inodes = t.inode_count_bound()
        disk = os.statvfs(self.store.path)
        frsize = 4096
        free = disk.f_bavail * disk.f_frsize
        return {
            "f_bsize": self.block_size, "f_frsize": frsize,
            "f_blocks": (counters.stored + free) // frsize,
            "f_bfree": free // frsize, "f_bavail": free // frsize,
            "f_files": n_inodes + (1 << 32), "f_ffree": 1 << 32, "f_favail": 1 << 32,
            "f_namemax": NAME_MAX,
        }

    def recover_orphans(self) -> int:
        """Delete inodes that were unlinked while open when the last session ended. Returns how many."""
        with self.store.write() as t:
            orphans = t.orphans()
            for ino in orphans:
                inode = t.inode(ino)
                if inode is None or inode.nlink == 0:
                    t.delete_inode(ino)
                else:
                    t.remove_orphan(ino)
        return len(orphans)
