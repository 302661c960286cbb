"""The namespace: what the filesystem *is* — inodes, directory entries, links, file data in blocks,
xattrs — independent of FUSE. The FUSE edge (fuseops.py) resolves paths and translates; this module
holds POSIX semantics and raises typed FsError subclasses, which only the edge turns into errno.

File data: a file is a sequence of fixed logical blocks (the store's block size). Writes are
buffered per file and flushed in one transaction (llmfs/writeback.py); reads take dirty blocks from
that buffer and the rest from the store (LM blocks through the decode cache), in one consistent
view, into the caller's buffer; what to decode ahead of readers is llmfs/prefetch_policy.py's
decision.

Damaged blocks: a stored block that does not decode fails the reads of its own range (CorruptData,
EIO at the edge; logged once per file and block, with the file's path) — a read spanning it and
good blocks fails, the good blocks alone read. Everything else works on such a file: stat, rename,
unlink, overwriting it, truncating it anywhere but inside the damaged block (keeping part of a
block means reading it; that truncate fails as a read would), and writing whole blocks over it.

Threading: FUSE calls arrive on many threads. `self._lock` guards the table of open files and every
metadata change that must be checked and applied atomically (link counts, names). Each open file
has its own lock for its data. Lock order: a file's lock, then `self._lock`, then the store's write
lock; never the other way round. Decoding (zstd, raw or the LM) runs outside all locks, on
containers read in one LMDB snapshot, so a slow decode never blocks other files or metadata: raw and
zstd blocks from the store's last committed snapshot, in place in its map (Store.snapshot, which
takes no lock), LM blocks copied out and decoded through the decode cache (_read_into).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from llmfs.codec import ContainerError
from llmfs.codec.container import ModelMismatch
from llmfs.codec.registry import CODEC_NAMES, LM, RAW, ZSTD, Registry, peek_header, verify

from .errors import (  # noqa: F401  (re-exported: the FUSE edge maps them by class)
    CorruptData,
    Exists,
    FsError,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    TooBig,
)
from .prefetch_policy import Credentials, PrefetchPolicy
from .store import ROOT_INO, Inode, Store, StoreError, codec_of, now_ns
from .writeback import DIRTY_LIMIT, OpenFile, WriteBuffer

log = logging.getLogger("llmfs")

NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
VIRTUAL_XATTR = b"user.llmfs."
# Released small files (at most one dirty block) are stored together: a batch is stored once it
# holds RELEASE_BATCH files, or RELEASE_WAIT seconds after its first file (Filesystem.release).
RELEASE_BATCH = 64
RELEASE_WAIT = 0.05
# Damaged blocks remembered as logged (so each is logged once); forgotten all at once past this.
DAMAGE_REPORTS_KEPT = 4096


@dataclass
class Handle:
    ino: int
    flags: int
    held: bool = False  # open for writing: holds the store's group commit (Store.hold)
    created: bool = False  # the create that made the file: its release ends the unstored mark


def _writes(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY


def _setid_killed(mode: int) -> int:
    """The set-ID bits that a write or truncate by a process without CAP_FSETID clears: setuid,
    and setgid if the file is group-executable (setgid without it marks mandatory locking)."""
    if not stat.S_ISREG(mode):
        return 0
    kill = mode & stat.S_ISUID
    if mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP:
        kill |= stat.S_ISGID
    return kill


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(name)
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise InvalidArgument(name)


class RemoteDecoder(Protocol):
    """Decodes LM containers elsewhere (llmfs/cluster.py's ClusterCoder on a Ray cluster)."""

    def decode_many(self, blobs: list[bytes]) -> list[bytes | None] | None:
        """Plaintexts (None for a block it could not do), or None when it declines the batch."""


def _place(out: memoryview, offset: int, end: int, i: int, bs: int, block) -> None:
    """Copy the part of block i (its plaintext; shorter: zeros after it) that bytes offset..end
    hold into out, which starts at offset."""
    lo = max(offset, i * bs) - i * bs
    hi = min(end, (i + 1) * bs) - i * bs
    dst = i * bs + lo - offset
    n = max(0, min(hi, len(block)) - lo)
    if n:
        out[dst : dst + n] = memoryview(block)[lo : lo + n]
    if n < hi - lo:
        out[dst + n : dst + hi - lo] = bytes(hi - lo - n)


class Filesystem:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        cache=None,
        dirty_limit: int = DIRTY_LIMIT,
        readahead=None,
        batch_releases: bool = False,
    ):
        """cache: decoded blocks by hash (cache.DecodeCache), None = no cache; readahead:
        cache.Readahead, which blocks a sequential reader wants next, None = off;
        batch_releases: store released small files in batches (release(); the mount does,
        with the store's group commit) — whoever sets it calls stop_batches() before closing
        the store."""
        self.store = store
        self.registry = registry
        self.cache = cache
        self.block_size = store.block_size
        self._lock = threading.RLock()
        self._files: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._reported: set[tuple[int, bytes]] = set()  # damaged blocks already logged
        # Blocks whose container failed its decode: hash -> (digest of the container's bytes,
        # the error's message). Decoding is deterministic, so the same bytes fail the same way: a reader
        # that retries (the kernel's readahead, then its single-page read, a backup tool) gets
        # EIO at once instead of another full decode — minutes for an LM block on a CPU. Keyed
        # by the bytes too: a container that changes (quarantine, a rewrite) is decoded anew.
        # Not remembered: ModelMismatch (a model or dictionary that could not be had is not
        # damage). Forgotten all at once past DAMAGE_REPORTS_KEPT.
        self._failed: dict[bytes, tuple[bytes, str]] = {}
        # Files whose close left their data to the release (flush), until they leave _files:
        # an fsync stores them first, so what was closed before it is durable after it.
        self._closed: dict[int, OpenFile] = {}
        # Released small files not stored yet (release()): ino -> (file, its creating handle
        # was released: its unstored mark ends with the batch), under _released_cond's lock (a
        # leaf: nothing else is taken while it is held).
        self.batch_releases = batch_releases
        self._released: dict[int, tuple[OpenFile, bool]] = {}
        self._released_cond = threading.Condition(threading.Lock())
        self._batcher: threading.Thread | None = None
        self._batcher_stop = False
        self._batch_started = 0.0  # monotonic time of the first file of the batch
        # False only while no file has an extended attribute (read at start, set before the
        # first setxattr commits, never cleared: "maybe" is always safe): getxattr_path then
        # answers ENODATA without a walk (the kernel's security.capability before each write).
        with store.read() as t:
            self._xattrs_may_exist = t.any_xattrs()
        self.buffer = WriteBuffer(store, registry, self._load_block, dirty_limit)
        self.prefetch = PrefetchPolicy(store, cache, readahead, self._decode_hashes)
        # Decodes cache misses' LM blocks elsewhere when it is faster (set by the mount with
        # --cluster); whatever it returns is checked here against the stored checksum.
        self.remote: RemoteDecoder | None = None

    # ------------------------------------------------------------------ attributes and lookup
    def lookup(self, parent: int, name: bytes) -> int:
        with self.store.read() as t:
            ino = self._lookup(t, parent, name)
        self.prefetch.remember(ino, parent, name)
        return ino

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

    def _walk(self, t, path: bytes, remember: bool = True) -> int:
        """Inode of an absolute path in snapshot t (no symlinks followed: the kernel does that);
        the prefetch policy remembers where it was found (unless told not to: only lookups and
        opens tell it what a directory walk reads next)."""
        ino, parent, name = ROOT_INO, None, b""
        for part in path.split(b"/"):
            if part:
                parent, name = ino, part
                # Only a directory has entries (an invariant fsck checks): a name found needs no
                # look at its parent's inode; a name not found asks _lookup which error it is
                # (as does one too long to exist: NameTooLong, not ENOENT).
                child = t.lookup(ino, part) if len(part) <= NAME_MAX else None
                ino = child if child is not None else self._lookup(t, ino, part)
        if parent is not None and remember:
            self.prefetch.remember(ino, parent, name)
        return ino

    def lookup_path(self, path: bytes) -> tuple[int, Inode]:
        """Inode number and attributes (as getattr) of an absolute path, in one snapshot: the
        FUSE edge's getattr, the most frequent call there is."""
        with self.store.read() as t:
            ino = self._walk(t, path)
            inode = t.inode(ino)
        if inode is None:
            raise NotFound(ino)
        return ino, self._with_dirty(ino, inode)

    def resolve(self, path: bytes) -> int:
        """Inode of an absolute path (no symlinks followed: the kernel does that)."""
        with self.store.read() as t:
            return self._walk(t, path)

    def getattr(self, ino: int) -> Inode:
        """The inode, with the size and mtime of unflushed writes applied."""
        with self.store.read() as t:
            inode = t.inode(ino)
        if inode is None:
            raise NotFound(ino)
        return self._with_dirty(ino, inode)

    def _with_dirty(self, ino: int, inode: Inode) -> Inode:
        f = self._files.get(ino)
        if f is not None and (f.mtime is not None or f.size != inode.size):
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
    def _new_inode(
        self, t, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0, target: bytes = b""
    ) -> tuple[int, Inode]:
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
        t.put_inode(parent, pinode.evolve(nlink=pinode.nlink + (1 if is_dir else 0), mtime=now, ctime=now))
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
            return self._new_inode(t, parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)[0]

    def readlink(self, ino: int) -> bytes:
        inode = self.getattr(ino)
        if not stat.S_ISLNK(inode.mode):
            raise InvalidArgument(ino)
        return inode.target

    def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        uid: int,
        gid: int,
        may_keep_setid: Callable[[], bool] | bool = True,
    ) -> int:
        """Create (or with no O_EXCL, open an existing) regular file; returns a file handle.
        A new file is marked unstored in its creating transaction (store.py's schema: a group
        commit may land before its data, which is stored at release; after a crash the next
        mount deletes it while still marked), so a crash finds it absent or whole, never
        created-but-empty. The mark ends with the flush that stores its data, the release of
        this handle (an empty file, closed, is what the user made), an fsync of it or an
        fsyncdir of its directory, or a clean unmount. A handle open for writing also holds the
        group commit (a timed commit waits briefly for its release), which keeps a commit out
        of the middle of a small file rewritten in place (open with O_TRUNC: a truncate, then
        writes, as on ext4; no mark: the file existed before).
        may_keep_setid: as for open (an existing file opened with O_TRUNC)."""
        with self._lock:
            with self.store.write() as t:
                existing = t.lookup(parent, name) if len(name) <= NAME_MAX else None
                if existing is None:  # (_new_inode checks the parent and the name)
                    ino, inode = self._new_inode(t, parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
                    t.add_unstored(ino)
            if existing is not None:
                if flags & os.O_EXCL:
                    raise Exists(name)
                return self.open(existing, flags, uid, gid, may_keep_setid=may_keep_setid)
            # A new file is empty and its times are now: O_TRUNC has nothing to do (and would
            # cost a transaction of its own on every `>` redirection, tar x and cp).
            return self._open_handle(ino, flags & ~os.O_TRUNC, inode, created=True)

    def link(self, ino: int, parent: int, name: bytes) -> None:
        with self._lock:
            if self._link(ino, parent, name):
                f = self._files.get(ino)
                if f is not None:
                    f.unlinked = False  # named again, committed: its last user keeps it

    def _link(self, ino: int, parent: int, name: bytes) -> bool:
        """link(); returns whether the file had no name before (an open, unlinked one)."""
        with self.store.write() as t:
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
        return inode.nlink == 0

    # ------------------------------------------------------------------ removing names
    def _drop_link(self, t, ino: int, inode: Inode, now: int) -> None:
        """One name of `ino` is gone: delete it, or keep it as an orphan while it is open."""
        nlink = 0 if inode.is_dir else inode.nlink - 1
        if nlink > 0:
            t.put_inode(ino, inode.evolve(nlink=nlink, ctime=now), inode)
        elif ino in self._files:
            t.put_inode(ino, inode.evolve(nlink=0, ctime=now), inode)
            t.add_orphan(ino)
            self._files[ino].unlinked = True  # (if this transaction fails, the last user only looks)
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

    def rename(self, old_parent: int, old: bytes, new_parent: int, new: bytes, flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (RENAME_NOREPLACE | RENAME_EXCHANGE):
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
                    if dinode.is_dir and old_parent != new_parent and self._is_ancestor(t, dst, old_parent):
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
                self.buffer.flush(f)  # a later flush must not overwrite the mtime set here
        self._update_inode(ino, **changes)

    # ------------------------------------------------------------------ xattrs
    def _virtual_xattr(self, ino: int, name: bytes) -> bytes:
        """user.llmfs.codec ("lm", "zstd", "raw", a mix like "lm:3,zstd:1", or "none"),
        user.llmfs.stored_size (bytes of the file's blocks in the store), and on the root
        user.llmfs.cache (the decode cache's metrics, JSON). Readable by name, not listed — so
        cp -a and rsync -X do not copy them as ordinary attributes."""
        if name == VIRTUAL_XATTR + b"cache" and ino == ROOT_INO:
            metrics = self.cache.metrics() if self.cache is not None else {}
            return json.dumps(metrics, sort_keys=True).encode()
        f = self._files.get(ino)
        if f is not None:
            with f.lock:
                self.buffer.flush(f)  # describe what the file holds, not what it held
        with self.store.read() as t:
            if t.inode(ino) is None:
                raise NotFound(ino)
            counts: dict[str, int] = {}
            stored = 0
            for h in t.block_hashes(ino, 0, (1 << 64) - 1).values():
                stored += t.stored_size(h) or 0
                head = t.header(h)
                cname = CODEC_NAMES[head.codec_id] if head is not None else "damaged"
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

    def getxattr_path(self, path: bytes, name: bytes) -> bytes:
        """getxattr of an absolute path, the walk and the attribute in one snapshot. The kernel
        asks for security.capability before a write to a file whose attributes it has just
        refreshed (the first write after a create or an open, and more: Linux clears setuid
        bits and capabilities itself, and libfuse 3.14 cannot hand that to us), so a small-file
        copy pays this once per file: one walk, no second transaction.

        While no file has any extended attribute (_xattrs_may_exist) the answer is ENODATA
        without a walk: the kernel asks only for a path whose every name it has looked up (a
        file removed meanwhile has no attributes either, as by inode on a local filesystem);
        a name too long to exist still says so."""
        if name.startswith(VIRTUAL_XATTR):
            return self._virtual_xattr(self.resolve(path), name)
        if not self._xattrs_may_exist:
            if any(len(part) > NAME_MAX for part in path.split(b"/")):
                raise NameTooLong(path)
            raise NoAttribute(name)
        with self.store.read() as t:
            value = t.xattr(self._walk(t, path, remember=False), name)
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
        self._xattrs_may_exist = True  # before the attribute can be seen (getxattr_path)
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
    def _pin(self, ino: int, inode: Inode | None = None) -> OpenFile:
        """inode: the file's inode if the caller read it under self._lock, which this takes (a
        file not in the table changes size only through a pinned one, dropped under the lock:
        what was read under it is current); else it is read here."""
        with self._lock:
            f = self._files.get(ino)
            if f is None:
                if inode is None:
                    with self.store.read() as t:
                        inode = t.inode(ino)
                if inode is None:
                    raise NotFound(ino)
                f = self._files[ino] = OpenFile(ino, inode.size, unlinked=inode.nlink == 0)
            f.users += 1
            return f

    def _unpin(self, f: OpenFile, settle: bool = False) -> None:
        """One user less. The flush's error (ENOSPC, EIO) is raised to this user, but the user
        is gone all the same; a file whose dirty blocks could not be stored stays in the table
        of open files with no user, so a later flush (another open, fsync, unmount) stores or
        reports them — its data is never dropped without a word. settle: the user is the
        handle that created the file, whose release ends its unstored mark (once stored)."""
        try:
            with f.lock:
                self.buffer.flush(f)
                if settle:
                    self._settle(f)
        finally:
            self._drop_user(f, 1)

    def _settle(self, f: OpenFile) -> None:
        """End f's unstored mark: its state in the store, even empty, is what the user made or
        was promised. Called with f's lock held, after a flush (nothing of f is buffered)."""
        if f.unstored:
            with self.store.write() as t:
                t.remove_unstored(f.ino)
            f.unstored = False

    def _drop_user(self, f: OpenFile, users: int) -> None:
        """`users` users of f are gone; forget f if it has none left and nothing to store."""
        with self._lock:
            f.users -= users
            if f.users or f.dirty or self._files.get(f.ino) is not f:
                return
            del self._files[f.ino]
            self._closed.pop(f.ino, None)
            self.prefetch.forget(f.ino)
            if f.unlinked:  # (set by _drop_link and _pin: no look into the store on every close)
                with self.store.write() as t:
                    inode = t.inode(f.ino)
                    if inode is not None and inode.nlink == 0:
                        t.delete_inode(f.ino)  # the last user of an unlinked file is gone

    def _open_handle(
        self,
        ino: int,
        flags: int,
        inode: Inode | None = None,
        f: OpenFile | None = None,
        created: bool = False,
    ) -> int:
        """A handle of ino, pinned (inode: as for _pin; f: ino already pinned for it; created:
        by create, which marked it unstored in the store)."""
        if f is None:
            f = self._pin(ino, inode)
        if created:
            f.unstored = True  # (under the namespace lock that create holds)
        held = _writes(flags)
        if held:
            self.store.hold()  # released with the handle (see create)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(ino, flags, held, created)
        if flags & os.O_TRUNC:
            # Linux truncates even with O_RDONLY (the kernel checked write permission), and with
            # atomic_o_trunc (libfuse 3's default) it leaves the truncation to open.
            with f.lock:
                self.buffer.truncate(f, 0)
        return fh

    def open(
        self,
        ino: int,
        flags: int,
        uid: int | None = None,
        gid: int | None = None,
        groups: tuple[int, ...] | Callable[[], tuple[int, ...]] = (),
        may_keep_setid: Callable[[], bool] | bool = True,
    ) -> int:
        """uid, gid, groups: the opener's credentials (the FUSE edge passes them), which bound
        what is decoded ahead for it: only files it could read itself. None: unknown, so only
        world-readable files are. groups may be a function that finds them (the edge reads them
        from /proc, which costs more than a whole small-file open: only worth it when a
        sibling's group decides).

        may_keep_setid: whether the opener has CAP_FSETID (or a function that tells, asked only
        when it decides): an O_TRUNC open by one that has not clears the setuid bit, and the
        setgid bit of a group-executable file, as a truncate does. The kernel does that itself
        for write and truncate, but with atomic_o_trunc (libfuse 3's default) it leaves the
        truncation of open(O_TRUNC) to the filesystem and drops the mode change it computed for
        it; so it is done here."""
        with self._lock:  # read and pinned under it: _pin need not read the inode again
            inode = self.getattr(ino)
            if inode.is_dir and (flags & os.O_ACCMODE) != os.O_RDONLY:
                raise IsADirectory(ino)
            f = self._pin(ino, inode)
        if flags & os.O_TRUNC and _setid_killed(inode.mode):
            try:
                keep = may_keep_setid() if callable(may_keep_setid) else may_keep_setid
                if not keep:
                    self._update_inode(ino, mode=inode.mode & ~_setid_killed(inode.mode))
            except BaseException:
                self._unpin(f)
                raise
        fh = self._open_handle(ino, flags, f=f)
        if inode.is_reg:
            self.prefetch.on_open(ino, inode, Credentials(uid, gid, groups))
        return fh

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

    def keep(self, ino: int) -> OpenFile:
        """Keep ino's inode and data while it may lose its last name, as an open handle does,
        until let_go(): for the FUSE edge, which cannot tell at once whether libfuse's hiding of
        a file it still counts open is an unlink or the first half of a rename (fuseops.py)."""
        return self._pin(ino)

    def let_go(self, f: OpenFile) -> None:
        """The end of keep(): a file with no name left and no user is deleted now."""
        self._drop_user(f, 1)

    def is_open(self, ino: int) -> bool:
        """Whether a handle (or an internal user) has the file pinned."""
        return ino in self._files

    def handle_ino(self, fh: int) -> int:
        try:
            return self._handles[fh].ino
        except KeyError:
            raise InvalidArgument(f"bad file handle {fh}") from None

    def release(self, fh: int) -> None:
        """The last close of a handle (FUSE RELEASE, sent after close(2) returned): its file's
        buffered data is stored, and the release of the handle that created it ends its
        unstored mark.

        With batch_releases and the group commit (Store.commits_later), a small file (at most
        one dirty block) and not unlinked is not stored here but in a batch with the files
        released around it: one transaction, one deduplication read and one counters update
        for up to RELEASE_BATCH files, stored by the release that fills the batch or by a
        thread of its own RELEASE_WAIT seconds after the batch's first file. Nothing promised
        changes: until then the file stays in the table of open files with its dirty data, so
        reads, stat and a new open see it as before; a sync (fsync, fsyncdir, unmount) stores
        the batch first; a crash before the batch is stored finds the file as a crash before
        its release did (its create may be committed, still marked unstored: the next mount
        deletes it — absent, never empty or torn); what a crash can lose grows by at most
        RELEASE_WAIT beyond the commit interval. A full disk is the group commit's failure in
        this mode, as for a release stored at once (ENOSPC reaches close(2) only when changes
        commit by themselves, which stores at close: flush()). The batch's dirty blocks count
        against the dirty limit as before, and make_room may store them first."""
        with self._lock:
            h = self._handles.pop(fh, None)
        if h is None:
            return
        f = self._files[h.ino]
        try:
            if (
                self.batch_releases
                and (f.mtime is not None or f.dirty or (h.created and f.unstored))  # work to do
                and len(f.dirty) <= 1
                and not f.unlinked
                and not self._batcher_stop
                and self.store.commits_later()
            ):
                self._drop_user(f, 1)  # it stays in the table while it has dirty data
                with self._released_cond:
                    prev = self._released.get(f.ino)
                    self._released[f.ino] = (f, h.created or (prev is not None and prev[1]))
                    n = len(self._released)
                    if n == 1:
                        self._batch_started = time.monotonic()  # the batch's clock starts
                        self._start_batcher()
                        self._released_cond.notify()
                if n >= RELEASE_BATCH:
                    self.store_released()
            else:
                self._unpin(f, settle=h.created)
        finally:
            if h.held:
                self.store.unhold()

    def _start_batcher(self) -> None:
        """Start the thread that stores a batch RELEASE_WAIT seconds after its first file
        (under _released_cond's lock)."""
        if self._batcher is None and not self._batcher_stop:
            self._batcher = threading.Thread(target=self._batch_loop, name="llmfs-release", daemon=True)
            self._batcher.start()

    def _batch_loop(self) -> None:
        cond = self._released_cond
        while True:
            with cond:
                while not self._released and not self._batcher_stop:
                    cond.wait()
                # More files join until RELEASE_WAIT after the first of the batch there is now
                # (a full batch stored by a release meanwhile starts another's clock).
                while self._released and not self._batcher_stop:
                    left = self._batch_started + RELEASE_WAIT - time.monotonic()
                    if left <= 0:
                        break
                    cond.wait(left)
                if self._batcher_stop:
                    return  # stop_batches stores what is left
            try:
                self.store_released()
            except Exception:  # the files keep their data buffered: a later flush stores them
                log.exception("storing released files failed")

    def stop_batches(self) -> None:
        """Store what the batch holds and stop its thread (unmount, before the final flush)."""
        with self._released_cond:
            self._batcher_stop = True
            self._released_cond.notify_all()
            thread = self._batcher
        if thread is not None:
            thread.join()
        self.store_released()

    def store_released(self) -> None:
        """Store the batch of released files in one transaction (release()); if that fails,
        each file alone, so that one file's failure (a full disk, a deleted inode) stays its
        own: such a file keeps its dirty data for a later flush, which reports it."""
        with self._released_cond:
            batch, self._released = self._released, {}
        if not batch:
            return
        files = [batch[ino][0] for ino in sorted(batch)]  # locks in one order: no deadlock
        settle = frozenset(ino for ino, (_, s) in batch.items() if s)
        taken = []
        try:
            for f in files:
                f.lock.acquire()
                taken.append(f)
            self.buffer.flush_many(files, settle)
        except (FsError, StoreError):
            for f in reversed(taken):
                f.lock.release()
            taken = []
            for f in files:
                try:
                    with f.lock:
                        self.buffer.flush(f)
                        if f.ino in settle:
                            self._settle(f)
                except (FsError, StoreError) as e:
                    log.warning(
                        "storing %s at its release: %s", self.path_of(f.ino).decode(errors="replace"), e
                    )
        finally:
            for f in reversed(taken):
                f.lock.release()
        for f in files:
            self._drop_user(f, 0)  # forget it (or delete it, unlinked meanwhile)

    def flush(self, fh: int) -> None:
        """close(2) of a descriptor (FUSE FLUSH). The file's buffered data is stored by the
        release that follows the last close of the open file (FUSE RELEASE, which the kernel
        sends after close(2) has returned), in the same single transaction: the closing process
        does not wait for it. Nothing is promised in between that this would break: until the
        release, reads and stat see the buffered data; the handle holds the group commit
        (create), so a crash still finds a small file absent or whole; and once released, the
        data is at most the commit interval from the disk, as before. Only when a change
        commits by itself (the disk is nearly full: Store.commits_later) is the data stored
        here, so that close(2) reports a full disk (ENOSPC) — in group mode a full disk is the
        group commit's failure, which a flush here could not report either."""
        f = self._files[self.handle_ino(fh)]
        if not f.dirty and f.mtime is None:
            return
        if self.store.commits_later():
            with self._lock:
                self._closed[f.ino] = f
            return
        with f.lock:
            self.buffer.flush(f)

    def fsync(self, fh: int | None, ino: int | None = None) -> None:
        ino = self.handle_ino(fh) if fh is not None else ino
        f = self._files.get(ino)
        if f is not None:
            with f.lock:
                self.buffer.flush(f)
                self._settle(f)  # an fsync'ed file survives a crash, even empty
        self.sync()

    def fsyncdir(self, ino: int) -> None:
        """fsync of directory ino: its entries are durable when it returns — those of new files
        not yet stored included, whose unstored marks end here (a crash must not delete a name
        an fsyncdir acknowledged)."""
        with self._lock:
            fresh = {f.ino: f for f in self._files.values() if f.unstored}
        if fresh:
            with self.store.read() as t:
                named = [fresh[child] for _, child in t.listdir(ino) if child in fresh]
            for f in named:
                with f.lock:
                    self._settle(f)
        self.sync()

    def end_session(self) -> None:
        """A clean unmount (after flush_all): every file's state is what the user gets back, so
        no unstored mark may outlive the session (an empty table is the clean state); and every
        user of the session is gone, so a file unlinked while open (a handle the kernel never
        released, or one the FUSE edge kept for a moment: Filesystem.keep) is deleted now — a
        clean store has no orphans (fsck: check_orphans)."""
        with self.store.write() as t:
            for ino in t.unstored():
                t.remove_unstored(ino)
            _delete_orphans(t)
        with self._lock:
            for f in self._files.values():
                f.unstored = False

    def sync(self) -> None:
        """Make every change so far durable (fsync, fsyncdir), the data of closed files whose
        release has not come yet included: the kernel sends RELEASE after close(2) returns, so
        an fsync right after a close may arrive first, and what was closed before an fsync was
        durable after it before close left the storing to release (flush). Released files
        waiting in a batch (release()) are stored first, their unstored marks ended."""
        self.store_released()
        for f in list(self._closed.values()):
            with f.lock:
                self.buffer.flush(f)
        self.store.sync()

    def flush_all(self) -> list[str]:
        """Flush every file's buffered writes and sync (unmount, SIGTERM, compact --now). A file
        that cannot be flushed does not stop the others and keeps its data buffered; returns one
        line per such file (path, bytes, why), also logged — empty when everything was stored.
        Raises only if the final sync fails (StoreError)."""
        lost = []
        for f in list(self._files.values()):
            try:
                with f.lock:
                    pending = len(f.dirty) * self.block_size
                    self.buffer.flush(f)
                self._drop_user(f, 0)  # one whose last user left while its flush failed
            except (FsError, StoreError) as e:
                line = (
                    f"{self.path_of(f.ino).decode(errors='replace')}: {pending} buffered "
                    f"bytes ({pending // self.block_size} blocks) could not be stored: {e}"
                )
                log.warning("flush: %s", line)
                lost.append(line)
        self.store.sync()
        return lost

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
            for h in hashes:
                failed = self._failed.get(h)
                if failed is not None and failed[0] == _digest(by_hash[h]):
                    raise ContainerError(failed[1])
            return self._decode_blobs([by_hash[h] for h in hashes])

        order = sorted(blocks)
        try:
            if self.cache is None:
                plain = decode([blocks[i][0] for i in order])
            else:
                plain = self.cache.get_many([blocks[i][0] for i in order], decode)
        except ContainerError as e:
            if len(order) > 1:  # one bad block fails only the reads of its own range
                out = {}
                for i in order:
                    out.update(self._decode(ino, {i: blocks[i]}))
                return out
            h, blob = blocks[order[0]]
            if blob is not None and not isinstance(e, ModelMismatch):
                with self._lock:
                    if len(self._failed) >= DAMAGE_REPORTS_KEPT:
                        self._failed.clear()
                    self._failed[h] = (_digest(blob), str(e))
            self._report_damage(ino, order[0], h, e)
            raise CorruptData(str(e)) from None
        return dict(zip(order, plain))

    def _report_damage(self, ino: int, idx: int, h: bytes, error: Exception) -> None:
        """Log a damaged block once per (file, block), with the file's path: a reader that
        retries must not flood the log."""
        with self._lock:
            if (ino, h) in self._reported:
                return
            if len(self._reported) >= DAMAGE_REPORTS_KEPT:
                self._reported.clear()
            self._reported.add((ino, h))
        log.error(
            "%s: block %d (bytes %d-%d) is unreadable: %s; its reads fail with EIO (run "
            "`llmfs fsck` to list every damaged file)",
            self.path_of(ino).decode(errors="replace"),
            idx,
            idx * self.block_size,
            (idx + 1) * self.block_size - 1,
            error,
        )

    def path_of(self, ino: int) -> bytes:
        """One path of an inode, for messages: found by walking the tree (directories keep no
        parent pointer), so only for rare events."""
        with self.store.read() as t:
            stack = [(ROOT_INO, b"")]
            while stack:
                d, prefix = stack.pop()
                for name, child in t.listdir(d):
                    path = prefix + b"/" + name
                    if child == ino:
                        return path
                    ci = t.inode(child)
                    if ci is not None and ci.is_dir:
                        stack.append((child, path))
        return f"<inode {ino}, unlinked>".encode()

    def _decode_hashes(self, hashes: list[bytes]) -> list[bytes]:
        """The prefetcher's decode: containers read now, in one snapshot, decoded as one batch.
        Always this bound method, so the prefetcher can batch keys from different requests."""
        with self.store.read() as t:
            blobs = [t.container(h) for h in hashes]
        if any(b is None for b in blobs):
            raise ContainerError("a block to prefetch is no longer stored")
        return self._decode_blobs(blobs)

    def _decode_blobs(self, blobs: list) -> list[bytes]:
        """Plaintexts of containers (one batch of the decode cache's misses). With a remote
        decoder its LM blocks are offered to it first (it declines when it would be slower);
        each plaintext it returns must match its container's stored length and checksum here,
        and every block it did not return correctly is decoded locally — a remote decoder that
        fails, hangs up or lies costs time, never a wrong byte."""
        remote = self.remote
        if remote is None:
            return self.registry.decode_many(blobs, self.block_size)
        got: dict[int, bytes] = {}
        try:
            heads = [peek_header(b) for b in blobs]
        except ContainerError:
            heads = []  # the local decode names the damage
        lm = [i for i, h in enumerate(heads) if h.codec_id == LM and h.length <= self.block_size]
        if lm:
            try:
                answer = remote.decode_many([bytes(blobs[i]) for i in lm])
            except Exception:  # an accelerator, never a reason for a read to fail
                log.exception("remote decode failed; decoding locally")
                answer = None
            for i, data in zip(lm, answer or ()):
                if data is None:
                    continue
                try:
                    verify(data, heads[i])
                except ContainerError:
                    log.error("a remotely decoded block does not match its checksum; decoding it locally")
                    continue
                got[i] = data
        rest = [i for i in range(len(blobs)) if i not in got]
        if rest:
            got.update(zip(rest, self.registry.decode_many([blobs[i] for i in rest], self.block_size)))
        return [got[i] for i in range(len(blobs))]

    def read(self, fh: int, size: int, offset: int) -> bytes:
        f = self._files[self.handle_ino(fh)]
        return self._read(f, size, offset)

    def read_into(self, fh: int, out: memoryview, offset: int) -> int:
        """Read up to len(out) bytes at offset into `out` (the FUSE edge passes libfuse's reply
        buffer); returns how many (0 at or past the end)."""
        f = self._files[self.handle_ino(fh)]
        return self._read_into(f, out, offset)

    def read_ino(self, ino: int, size: int, offset: int) -> bytes:
        f = self._pin(ino)
        try:
            return self._read(f, size, offset)
        finally:
            self._unpin(f)

    def _read(self, f: OpenFile, size: int, offset: int) -> bytes:
        out = bytearray(size)
        n = self._read_into(f, memoryview(out), offset)
        del out[n:]
        return bytes(out)

    def _read_into(self, f: OpenFile, out: memoryview, offset: int) -> int:
        """The read path. Under the file's lock: its dirty blocks are copied into `out`, and the
        containers of the others are found — in the store's last committed snapshot, as views into
        the map, or (new in the open group) copied out of the group. Outside every lock, with the
        snapshot still open: raw and zstd blocks are decoded from the map straight into `out` (a
        raw block is checked and copied once); they bypass the decode cache, which would only
        save a memcpy or a zstd decode and would push LM blocks out of its first stage, while the
        kernel's page cache already keeps what was read. LM blocks are copied out and decoded
        through the cache as before (single flight, batched, prefetched). A container that does
        not decode from the snapshot sends the whole read to _read_checked, which reads every
        block from the group and reports the damage (a block healed in the group since the
        snapshot reads right there)."""
        bs = self.block_size
        views: dict[int, tuple[bytes, object]] = {}
        lm: dict[int, tuple[bytes, bytes | None]] = {}  # LM (and quarantined) blocks: the cache's way
        with self.store.snapshot() as snap:
            with f.lock:
                end = min(offset + len(out), f.size)
                if offset >= end:
                    return 0
                first, last = offset // bs, (end - 1) // bs
                stored = []
                for i in range(first, last + 1):
                    buf = f.dirty.get(i)
                    if buf is None:
                        stored.append(i)
                    else:
                        _place(out, offset, end, i, bs, buf)
                if stored:
                    with self.store.read() as t:
                        hashes = t.block_hashes(f.ino, stored[0], stored[-1])
                        for i in stored:
                            h = hashes.get(i)
                            if h is None:  # a hole
                                _place(out, offset, end, i, bs, b"")
                                continue
                            view = snap.container_view(h)
                            views[i] = (h, view if view is not None else t.container(h))
            try:
                for i, (h, blob) in views.items():
                    if blob is None or codec_of(blob) not in (RAW, ZSTD):  # LM (damaged)
                        lm[i] = (h, bytes(blob) if blob is not None else None)
                        continue
                    lo = max(offset, i * bs) - i * bs
                    dst = i * bs + lo - offset
                    want = min(end, (i + 1) * bs) - i * bs - lo
                    n = self.registry.decode_into(blob, out[dst : dst + want], lo, bs)
                    if n < want:  # a short last block: zeros after it
                        out[dst + n : dst + want] = bytes(want - n)
            except ContainerError:
                damaged = True
            else:
                damaged = False
        if damaged:
            data = self._read_checked(f, len(out), offset)
            out[: len(data)] = data
            return len(data)
        self.prefetch.on_read(f.ino, first, last, f.size)
        for i, block in self._decode(f.ino, lm).items():
            _place(out, offset, end, i, bs, block)
        return end - offset

    def _read_checked(self, f: OpenFile, size: int, offset: int) -> bytes:
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
        self.prefetch.on_read(f.ino, first, last, f.size)
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

    def _load_block(self, ino: int, idx: int) -> bytes | None:
        """Stored plaintext of one block (None for a hole): what a partial write starts from."""
        return self._decode(ino, self._containers(ino, idx, idx)).get(idx)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        h = self._handles.get(fh)
        if h is None:
            raise InvalidArgument(f"bad file handle {fh}")
        f = self._files[h.ino]
        self.buffer.make_room(len(data) + self.block_size)  # no lock held: may flush any file
        with f.lock:
            if h.flags & os.O_APPEND:
                offset = f.size
            self.buffer.write(f, data, offset)
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
                self.buffer.truncate(f, length)
        finally:
            self._unpin(f)

    # ------------------------------------------------------------------ whole filesystem
    def statfs(self) -> dict:
        with self.store.read() as t:
            counters = t.counters
            n_inodes = t.inode_count_bound()
        disk = os.statvfs(self.store.path)
        frsize = 4096
        free = disk.f_bavail * disk.f_frsize
        return {
            "f_bsize": self.block_size,
            "f_frsize": frsize,
            "f_blocks": (counters.stored + free) // frsize,
            "f_bfree": free // frsize,
            "f_bavail": free // frsize,
            "f_files": n_inodes + (1 << 32),
            "f_ffree": 1 << 32,
            "f_favail": 1 << 32,
            "f_namemax": NAME_MAX,
        }

    def recover_orphans(self) -> int:
        """Delete inodes that were unlinked while open when the last session ended. Returns how many."""
        with self.store.write() as t:
            return _delete_orphans(t)


def _digest(blob) -> bytes:
    """A digest of a container's bytes (Filesystem._failed: the same bytes fail the same way)."""
    return hashlib.blake2b(blob, digest_size=16).digest()


def _delete_orphans(t) -> int:
    """Delete the inodes unlinked while open (none of their users is left); one named again
    keeps its data and loses only the mark. Returns how many were marked."""
    orphans = t.orphans()
    for ino in orphans:
        inode = t.inode(ino)
        if inode is None or inode.nlink == 0:
            t.delete_inode(ino)
        else:
            t.remove_orphan(ino)
    return len(orphans)
