"""The block store: one LMDB environment holding the whole filesystem — metadata and compressed blocks.

THE ON-DISK SCHEMA (the one place it is written down)
=====================================================
A store is a directory: `data.mdb` + `lock.mdb` (LMDB) and `llmfs.lock` (held with flock by the one
process that has the store open for writing: a mount, fsck --repair, compact). All integers are
big-endian so keys sort numerically. Named sub-databases:

  meta      str key → value
              "magic"          b"llmfs-store" — identifies a store
              "format"         u32 store format version (FORMAT_VERSION; compatibility rule below)
              "block_size"     u32 logical block size in bytes, fixed at mkfs
              "model"          utf-8 model spec chosen at mkfs ("" = the default model)
              "next_ino"       u64 next inode number to hand out (never reused)
              "clean"          b"1" after a clean unmount, b"0" while mounted: a "0" at mount time means
                               the last session crashed (recorded, reported, checked)
              "counters"       COUNTERS struct: logical file bytes, and per codec id
                               (block count, plaintext bytes, container bytes) of unique blocks
              "created"        i64 ns since the epoch
              "dict:" + hex id an LM dictionary (codec/lm/dictionary.py: the priming tokens every
                               segment of an LM block of payload version 4 continues), stored
                               under its content id; never deleted (a few hundred bytes each)
              "dictionary"     8-byte id of the dictionary new LM blocks continue (absent: none,
                               blocks are written as payload version 3); set by `llmfs tune`
              "dictclasses"    the store's classes of text (dictionary.Classes' serialized form:
                               per class a bigram profile and its dictionary's id or none): when
                               present, each new LM block continues the dictionary of the class it
                               matches, or none; set by `llmfs tune` when its samples form several
  inodes    u64 ino → INODE struct (mode, uid, gid, nlink, size, atime, mtime, ctime, rdev: times are
            integer nanoseconds) followed, for symlinks only, by the target bytes
  dirents   u64 parent ino + name bytes → u64 child ino
  blockmap  u64 ino + u64 block index → 32-byte block hash (blake3 of the plaintext block)
  blocks    32-byte hash → container bytes (codec/container.py): a full container (version 1 or 2)
            or, from format 3 on, for LM blocks, the compact form (container.py, COMPACT_TAG): the
            LM container less its magic, version, codec id, xxh3 checksum and fingerprint, with a
            store-local model number (table modelnums) — 4 header bytes where version 2 has 24;
            from format 4 on, an LM block whose payload names a dictionary is kept with the
            dictionary's store-local number (table dictnums) in place of the payload's 8-byte
            id (container.py, COMPACT_DICT_TAG: 7 bytes less). The id lives in the payload: a
            reader gets it back in the keyed container (expanded), so a block copied out of the
            store names its dictionary as a standalone container does.
            Readers never see the compact form: every Txn method that hands out a block
            (container, container_view, header, blocks, block_headers) expands it into the keyed
            container (version 3) whose check is the key itself, blake3 of the plaintext, so
            every decode (reads, the decode cache, readahead, compaction, fsck, the cluster's
            workers) is verified against the key. Writers hand in full containers; set_block and
            replace_container store an LM one compact (numbering its model on first use, in the
            same transaction), and the counters count the bytes kept at rest.
  refs      32-byte hash → u64 reference count
  xattrs    u64 ino + name bytes → value bytes
  orphans   u64 ino → b"" : inodes whose last name is gone while a process still has them open; their
            data lives until the last close; after a crash they are purged at the next mount
  unstored  u64 ino → b"" : regular files created by this session that nothing has stored yet and
            whose creator has not closed them: the mark is put in the transaction that creates the
            file and removed in the transaction that first stores data into it (a flush leaving it
            non-empty), or by the release of the handle that created it (an empty file, closed:
            what the user made; with release batches, in the batch's transaction), by an fsync of it, by an fsyncdir of a directory naming it, and
            at a clean unmount. A group commit can land between a file's create and its data
            (they are separate requests, and the data is stored at release, or for a small file in
            the batch stored after it: llmfs/namespace.py's release); after a crash the
            next mount deletes every marked inode that is still empty together with all its
            names (hard links and renames included), so a burst of small files comes back absent
            or whole, never created-but-empty. Created at open when missing (stores made before
            it): no format bump, because an older release only ignores the table — it would keep
            such files empty after a crash, as it always did — and this release drops a mark
            whose inode has data or is gone.
  pending   32-byte hash → i64 ns when the block was stored by the fast path (zstd/raw): the queue of
            blocks background compaction re-encodes with the LM
  models    model fingerprint (8 bytes: codec/container.py; 16 in stores made before container
            format 2, whose first 8 bytes are the fingerprint) → utf-8 model spec, for every model
            that coded a block in this store (the spec it was loaded from: informational since
            format 2, and how blocks of a format 1 store find their model until it is embedded)
  modelfiles  (format 2) 32-byte blake3 digest → model file (codec/lm/modelfile.py: the engine-ready
            integer weights and scales, Config, canonical tokenizer and engine version): everything
            decoding an LM block needs besides code, stored once per model (about the size of its
            int8 weights)
  modelkeys   (format 2) model fingerprint (8 bytes) → 32-byte digest of the modelfiles entry that
            decodes it: the model's own fingerprint and each alias its manifest lists
  modelnums   (format 3) u32 store-local model number → 8-byte model fingerprint: the number a
            compact LM block names its model by. Numbers are handed out from 0 up, never reused,
            renumbered or deleted (a dozen bytes per model)
  dictnums    (format 4) u32 store-local dictionary number → 8-byte dictionary id: the number a
            compact LM block (COMPACT_DICT_TAG) names its dictionary by, handed out as modelnums'
            (from 0 up, on the first block that continues the dictionary, in its transaction;
            never reused, renumbered or deleted)

FORMAT VERSIONS (which llmfs reads which store)
  1  the tables above without modelfiles/modelkeys; written by releases up to main 2fa6d7d, which
     read only format 1 (they refuse a format 2 store: "has store format version 2; this llmfs
     reads version 1", never calling its blocks corrupt).
  2  this release: adds modelfiles and modelkeys. It reads formats 1 and 2. A format 1 store opened
     with the lock (mount, fsck, compact) is upgraded in place, in one transaction that creates the
     two empty tables and sets "format" to 2 (nothing else changes: every format 1 block decodes as
     before, its model loaded by spec until it is embedded); opened without the lock (stat) or
     read-only it is read as it is. A store of a format above 2 is refused with a message to
     install a newer llmfs. Each later format keeps reading every earlier one, upgrading in place.
  3  this release: adds modelnums and compact LM blocks (a release that reads only formats 1-2
     refuses it as above: it would take a compact block for a damaged one, and its fsck --repair
     would quarantine it). Reads formats 1 to 3; a format 1 or 2 store opened with the lock is
     upgraded in place in one transaction (the missing tables created, "format" set to 3); its
     blocks stay as they are (full containers keep decoding; any re-encoding stores them
     compact, and `llmfs compact --recode` rewrites them compact without the model:
     Txn.kept_longer, restore_shorter). Opened without the lock it is read as it is, and
     nothing is written compact into a store without modelnums.
  4  this release: adds dictnums and compact LM blocks with a dictionary number (a release that
     reads only formats 1-3 refuses it as above: it would take such a block for a damaged one).
     Reads formats 1 to 4; a format 1-3 store opened with the lock is upgraded in place as
     above (the missing tables created, "format" set to 4); its blocks stay as they are (a block
     stored with its dictionary id keeps it until it is re-encoded, or `llmfs compact --recode`
     rewrites it with the number, 7 bytes shorter, without the model).
  5  this release: dictionaries ("dict:" entries) may be of DICT_FORMAT 2, with a mixer-only
     extension (codec/lm/dictionary.py; a release that reads only formats 1-4 refuses it as
     above: it would take such a dictionary, and every block that continues it, for damaged
     ones). No new table. Reads formats 1 to 5; a format 1-4 store opened with the lock is
     upgraded in place as above ("format" set to 5, the missing tables created).

INVARIANTS (fsck.py checks each one by name)
  * refs[h] == number of blockmap entries naming h, and refs[h] >= 1 for every h in refs;
    blocks and refs have exactly the same keys.
  * every blockmap value names a key of blocks; blockmap entries of ino exist only for block
    indices < ceil(inodes[ino].size / block_size), and never for a block of all zeros (a hole).
  * a block's container decodes to block_size bytes or fewer, whose blake3 is its key.
  * a compact block's model number is a key of modelnums; modelnums values are distinct; the
    same for a compact block's dictionary number and dictnums.
  * every dirent names an existing inode; every inode except ROOT_INO and orphans is named by
    exactly inodes[ino].nlink dirents (directories: by one dirent, nlink = 2 + subdirectories).
  * the root inode is ROOT_INO and is a directory; inode numbers are never reused.
  * pending ⊆ blocks; counters equal the sums over inodes and blocks.
  * every unstored key names an existing regular file of size 0 with no block map entries; after
    a clean unmount the table is empty.
  * every "dict:" entry's id is the content id of its value, and every LM block of payload
    version 4 names a dictionary the meta table holds (it is stored before its first block).
  * blake3(modelfiles[d]) == d; every modelkeys value is a key of modelfiles, and the model file
    it names lists that fingerprint (as its own or an alias); every LM block written by a format 2
    release has its fingerprint in modelkeys (the model is embedded before its first block is
    stored). A fingerprint of a block with no modelkeys entry is a format 1 leftover: fsck reports
    it and --repair embeds its model when this machine can still build it.

DAMAGED BLOCKS
  A stored byte can rot. A container whose header cannot be read is still a block like any other
  for every metadata operation: it can lose references and be deleted, its file unlinked,
  truncated, overwritten or renamed. Only its plaintext is gone: reads of its range fail (EIO).
  What the store cannot know is how it was counted (its codec and plaintext length are in the bad
  header), so deleting or replacing it leaves the counters off by that block until they are
  recounted (fsck --repair; a mount after a crash recounts them). `fsck --repair` quarantines a
  damaged block: its container becomes a DAMAGED one (codec/registry.py), which reads as EIO for
  good and which fsck accepts; a later write of the block's content (found by its hash) replaces
  it with a good container, healing every file that shares it.

TRANSACTIONS
  LMDB allows one writer. Every change that must be atomic (a flush: blocks + refcounts + block map +
  size) is one write transaction, so a crash leaves the old or the new state, never a mix. Nothing
  slow (compression, the model) runs inside a write transaction. The environment is opened with
  sync on and metasync off: a commit fdatasyncs its pages but writes the meta page without a sync,
  so a system crash can undo at most the last commit and never corrupts; `sync()` makes it durable.
  MDB_NOSYNC is not used: LMDB keeps the environment consistent without syncs only on a filesystem
  that preserves write order, and ext4 does not (the OS may write a meta page before the pages it
  names, or after a freed page of the last durable tree was overwritten).

GROUP COMMIT (the mount daemon: `start_group_commit()`)
  A synchronous commit costs an fdatasync (about a millisecond or two on a busy disk), and a small
  file took three of them. So while mounted, one long-lived LMDB write transaction — the group —
  collects the changes of all threads and files; every `write()` block is a nested (child)
  transaction of it, so an operation that fails still rolls back alone, and reads see the group's
  uncommitted changes. A committer thread, which alone begins and commits groups (LMDB's writer
  mutex belongs to the thread that took it), commits the group and syncs the environment:
    * when `sync()` is called (fsync, fsyncdir, unmount): every change made before the call is
      durable when it returns; concurrent callers share one commit;
    * COMMIT_INTERVAL seconds after the group's first change — the bound on what a system crash
      or kill -9 can lose of changes nobody fsync'ed, like ext4's 5 s commit interval;
    * when the group holds GROUP_BYTES of new block containers (bounds the daemon's memory).
  A timed commit waits up to DRAIN seconds for a moment with no `hold()` (the namespace holds
  while a file is open for writing), so a crash tends to find a file as of its close; a file open
  for longer is committed as it is. That wait is no guarantee (in a continuous burst the holds
  overlap): what guarantees that a new file comes back absent or whole after a crash, never
  created-but-empty, is the `unstored` table above.
  A group is one LMDB transaction: a crash leaves the state after some group, never part of one.
  With less than LOW_SPACE free on the disk the group mode pauses and each write() commits
  itself: a full disk then fails the one operation (ENOSPC) instead of a whole group. A group
  that fails to commit otherwise (EIO) loses its changes: the store then refuses further writes
  and syncs (EIO) rather than pretend they were kept.

Threading: a Store is shared by all FUSE threads. Without a group, read transactions are per call
(LMDB MVCC: a reader sees one consistent snapshot) and write transactions are serialised by a lock
here, because py-lmdb write transactions must stay on the thread that began them. With a group,
reads and writes go through the group under that lock (the GIL serialises them anyway; decoding
and compression run outside it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import blake3
import lmdb

from llmfs.codec import container as ct
from llmfs.codec.container import FINGERPRINT_SIZE, ContainerError, Header
from llmfs.codec.container import FORMAT_VERSION as CONTAINER_FORMAT
from llmfs.codec.container import MAGIC as CONTAINER_MAGIC
from llmfs.codec.lm.dictionary import dictionary_offset
from llmfs.codec.registry import DAMAGED, LM, peek_header

log = logging.getLogger("llmfs")

FORMAT_VERSION = 5
READS_FORMATS = (1, 2, 3, 4, 5)
MAGIC = b"llmfs-store"
ROOT_INO = 1
HASH_SIZE = 32
LOCK_FILE = "llmfs.lock"
# The map is address space, not disk: LMDB grows data.mdb as needed up to this.
MAP_SIZE = 1 << 40
# A failed commit with less free disk than this is a full disk: a flush writes at most the dirty
# limit (64 MiB) plus LMDB's copy-on-write pages.
FULL_DISK_SLACK = 128 << 20
# Group commit (see GROUP COMMIT above).
COMMIT_INTERVAL = 5.0  # seconds from a group's first change to its commit: the crash-loss bound
DRAIN = 0.1  # seconds a timed commit waits for no file to be open for writing
GROUP_BYTES = 64 << 20  # new container bytes that make a group commit early
LOW_SPACE = FULL_DISK_SLACK + 2 * GROUP_BYTES  # below this much free disk, no groups
SPACE_CHECK = 0.5  # seconds between looks at the free disk space

DB_NAMES_V1 = (
    "meta",
    "inodes",
    "dirents",
    "blockmap",
    "blocks",
    "refs",
    "xattrs",
    "orphans",
    "pending",
    "models",
)
DB_NAMES_V2 = DB_NAMES_V1 + ("modelfiles", "modelkeys")
DB_NAMES_V3 = DB_NAMES_V2 + ("modelnums",)
DB_NAMES = DB_NAMES_V3 + ("dictnums",)  # format 4
# Tables a store of the current format may lack (made before they existed): created when the
# store is opened for writing, read as empty otherwise (see the schema above).
LATER_DBS = ("unstored",)

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_INODE = struct.Struct(">IIIIQqqqQ")
_PAIR = struct.Struct(">QQ")
# counters: logical file bytes, then (blocks, plaintext bytes, container bytes) for codec ids 0..7
_N_CODECS = 8
_COUNTERS = struct.Struct(">q" + "qqq" * _N_CODECS)


class StoreError(Exception):
    """A store cannot be opened or used; the message says what to do."""


class NotAStore(StoreError):
    pass


class UnsupportedFormat(StoreError):
    pass


class StoreLocked(StoreError):
    pass


class StoreFull(StoreError):
    """The disk or the LMDB map is full; the transaction was rolled back."""


class StoreIOError(StoreError):
    """The disk failed a write; the transaction was rolled back."""


class _Group:
    """State of the group commit, guarded by the store's lock (`cond`'s lock)."""

    def __init__(self, lock: threading.RLock, interval: float, drain: float, max_bytes: int):
        self.cond = threading.Condition(lock)
        self.interval = interval
        self.drain = drain
        self.max_bytes = max_bytes
        self.txn: lmdb.Transaction | None = None  # the open group (None: paused, low space)
        self.first_change: float | None = None  # monotonic time of the group's first change
        self.bytes = 0  # new container bytes in the group
        self.changes = 0  # write() blocks committed into groups, ever
        self.durable = 0  # `changes` value that the last commit + sync made durable
        self.wanted = 0  # highest `changes` value a sync() caller waits for
        self.holds = 0  # files open for writing (namespace holds)
        self.draining = False  # a timed commit waits for holds to reach 0
        self.failed: str | None = None
        self.stop = False
        self.low_space = False
        self.space_checked = 0.0
        self.thread: threading.Thread | None = None


def block_hash(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def now_ns() -> int:
    return time.time_ns()


class Inode(NamedTuple):
    """An inode record. A NamedTuple (not a frozen dataclass): unpacked on every lookup and stat,
    where a dataclass's field-by-field init cost several times as much."""

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime: int
    mtime: int
    ctime: int
    rdev: int = 0
    target: bytes = b""  # symlinks only

    def pack(self) -> bytes:
        return (
            _INODE.pack(
                self.mode,
                self.uid,
                self.gid,
                self.nlink,
                self.size,
                self.atime,
                self.mtime,
                self.ctime,
                self.rdev,
            )
            + self.target
        )

    @classmethod
    def unpack(cls, buf) -> Inode:
        return cls(*_INODE.unpack_from(buf, 0), bytes(buf[_INODE.size :]))

    def evolve(self, **changes) -> Inode:
        return self._replace(**changes)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass
class Counters:
    logical: int
    per_codec: list  # [[blocks, plain bytes, stored bytes], ...] indexed by codec id

    @classmethod
    def zero(cls) -> Counters:
        return cls(0, [[0, 0, 0] for _ in range(_N_CODECS)])

    def pack(self) -> bytes:
        r = self.per_codec  # (spelled out: every write of a file's data packs them)
        return _COUNTERS.pack(self.logical, *r[0], *r[1], *r[2], *r[3], *r[4], *r[5], *r[6], *r[7])

    @classmethod
    def unpack(cls, buf) -> Counters:
        v = _COUNTERS.unpack(buf)
        return cls(
            v[0],
            [
                [v[1], v[2], v[3]],
                [v[4], v[5], v[6]],
                [v[7], v[8], v[9]],
                [v[10], v[11], v[12]],
                [v[13], v[14], v[15]],
                [v[16], v[17], v[18]],
                [v[19], v[20], v[21]],
                [v[22], v[23], v[24]],
            ],
        )

    @property
    def stored(self) -> int:
        return sum(row[2] for row in self.per_codec)


def ino_key(ino: int) -> bytes:
    return _U64.pack(ino)


def dirent_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


def blockmap_key(ino: int, index: int) -> bytes:
    return _PAIR.pack(ino, index)


class Txn:
    """One LMDB transaction with the schema's operations. Write transactions also keep the counters."""

    def __init__(self, store: Store, txn: lmdb.Transaction, write: bool):
        self.store = store
        self.txn = txn
        self.write = write
        self.db = store.db
        self._counters: Counters | None = None
        self.new_bytes = 0  # container bytes this transaction stored (the group's memory bound)
        # model number -> fingerprint and ("d", dictionary number) -> dictionary id, looked up
        self._numbers: dict[tuple[str, int], bytes | None] = {}

    # -- meta ----------------------------------------------------------------------------------
    def meta(self, key: str) -> bytes | None:
        return self.txn.get(key.encode(), db=self.db["meta"])

    def set_meta(self, key: str, value: bytes) -> None:
        self.txn.put(key.encode(), value, db=self.db["meta"])

    @property
    def counters(self) -> Counters:
        if self._counters is None:
            raw = self.meta("counters")
            self._counters = Counters.unpack(raw) if raw else Counters.zero()
        return self._counters

    def codec_blocks(self, codec_id: int) -> int:
        """How many unique blocks of this codec the store holds (one counter, read without
        unpacking them all: asked on every open)."""
        if self._counters is not None:
            return self._counters.per_codec[codec_id][0]
        raw = self.meta("counters")
        return _I64.unpack_from(raw, 8 + 24 * codec_id)[0] if raw else 0

    def set_counters(self, counters: Counters) -> None:
        """Replace the usage counters (fsck's repair after recounting)."""
        self._counters = counters

    def inode_count_bound(self) -> int:
        """Inode numbers handed out so far (an upper bound on the inodes in use)."""
        return _U64.unpack(self.meta("next_ino"))[0] - 1

    def next_ino(self) -> int:
        ino = _U64.unpack(self.meta("next_ino"))[0]
        self.set_meta("next_ino", _U64.pack(ino + 1))
        return ino

    # -- inodes --------------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode | None:
        raw = self.txn.get(ino_key(ino), db=self.db["inodes"])
        return Inode.unpack(raw) if raw is not None else None

    def put_inode(self, ino: int, inode: Inode, old: Inode | None = None) -> None:
        if inode.is_reg:
            before = old.size if old is not None else 0
            if before != inode.size:
                self.counters.logical += inode.size - before
        self.txn.put(ino_key(ino), inode.pack(), db=self.db["inodes"])

    def delete_inode(self, ino: int) -> None:
        """Drop an inode with no names and no openers: its blocks, xattrs and the record."""
        inode = self.inode(ino)
        if inode is None:
            return
        if inode.is_reg:
            self.counters.logical -= inode.size
            self.truncate_blocks(ino, 0)
        xdb = self.db["xattrs"]
        for key in list(self._prefix_keys(xdb, ino_key(ino))):
            self.txn.delete(key, db=xdb)
        self.txn.delete(ino_key(ino), db=self.db["inodes"])
        self.remove_orphan(ino)
        self.remove_unstored(ino)

    def inodes(self):
        with self.txn.cursor(db=self.db["inodes"]) as cur:
            for key, val in cur:
                yield _U64.unpack(key)[0], Inode.unpack(val)

    # -- directory entries ---------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> int | None:
        raw = self.txn.get(dirent_key(parent, name), db=self.db["dirents"])
        return _U64.unpack(raw)[0] if raw is not None else None

    def link(self, parent: int, name: bytes, ino: int) -> None:
        self.txn.put(dirent_key(parent, name), _U64.pack(ino), db=self.db["dirents"])

    def unlink(self, parent: int, name: bytes) -> None:
        self.txn.delete(dirent_key(parent, name), db=self.db["dirents"])

    def listdir(self, parent: int, after: bytes | None = None):
        """(name, ino) of a directory's entries, in name order (only names > `after` if given)."""
        prefix = ino_key(parent)
        with self.txn.cursor(db=self.db["dirents"]) as cur:
            if not cur.set_range(prefix if after is None else dirent_key(parent, after)):
                return
            for key, val in cur:
                if key[:8] != prefix:
                    break
                name = bytes(key[8:])
                if name != after:
                    yield name, _U64.unpack(val)[0]

    def is_empty_dir(self, ino: int) -> bool:
        return next(iter(self.listdir(ino)), None) is None

    def all_dirents(self):
        with self.txn.cursor(db=self.db["dirents"]) as cur:
            for key, val in cur:
                yield _U64.unpack(key[:8])[0], bytes(key[8:]), _U64.unpack(val)[0]

    # -- orphans -------------------------------------------------------------------------------
    def add_orphan(self, ino: int) -> None:
        self.txn.put(ino_key(ino), b"", db=self.db["orphans"])

    def remove_orphan(self, ino: int) -> None:
        self.txn.delete(ino_key(ino), db=self.db["orphans"])

    def orphans(self) -> list[int]:
        with self.txn.cursor(db=self.db["orphans"]) as cur:
            return [_U64.unpack(k)[0] for k in cur.iternext(values=False)]

    # -- files created and not yet stored (schema: unstored) -----------------------------------
    def add_unstored(self, ino: int) -> None:
        self.txn.put(ino_key(ino), b"", db=self.db["unstored"])

    def remove_unstored(self, ino: int) -> None:
        db = self.db.get("unstored")
        if db is not None:
            self.txn.delete(ino_key(ino), db=db)

    def unstored(self) -> list[int]:
        db = self.db.get("unstored")
        if db is None:
            return []
        with self.txn.cursor(db=db) as cur:
            return [_U64.unpack(k)[0] for k in cur.iternext(values=False)]

    # -- blocks --------------------------------------------------------------------------------
    def block_hashes(self, ino: int, first: int, last: int) -> dict[int, bytes]:
        """{index: hash} of the mapped blocks first..last inclusive (holes are absent)."""
        out = {}
        with self.txn.cursor(db=self.db["blockmap"]) as cur:
            if not cur.set_range(blockmap_key(ino, first)):
                return out
            for key, val in cur:
                k_ino, idx = _PAIR.unpack(key)
                if k_ino != ino or idx > last:
                    break
                out[idx] = bytes(val)
        return out

    def container(self, h: bytes) -> bytes | None:
        """Block h's container, a compact one expanded (see the schema's `blocks`)."""
        raw = self.txn.get(h, db=self.db["blocks"])
        return bytes(self._expand(h, raw)) if raw is not None else None

    def container_view(self, h: bytes) -> memoryview | bytes | None:
        """Block h's container as the transaction hands it out: in a snapshot() a memoryview into
        the map, valid only inside it, not copied (a compact one: expanded, so a copy)."""
        raw = self.txn.get(h, db=self.db["blocks"])
        return self._expand(h, raw) if raw is not None else None

    def header(self, h: bytes) -> Header | None:
        """The header of block h's container; None if h is not stored or its header is damaged."""
        raw = self.txn.get(h, db=self.db["blocks"])
        return self._header(h, raw) if raw is not None else None

    def stored_size(self, h: bytes) -> int | None:
        """The bytes block h's container takes at rest (what the counters count)."""
        raw = self.txn.get(h, db=self.db["blocks"])
        return len(raw) if raw is not None else None

    def _expand(self, h: bytes, raw):
        """A compact container as its keyed (version 3) form; any other as it is. A compact one
        that cannot be expanded (damaged fields, a model number the store does not know) is
        handed out as it is: reading its header then fails (CompactOutsideStore), as a damaged
        block's does."""
        if not len(raw) or raw[0] not in ct.COMPACT_TAGS:
            return raw
        fields = self._compact_fields(h, raw)
        return raw if fields is None else ct.expand(raw, bytes(h), fields[1], fields[2])

    def _header(self, h: bytes, raw) -> Header | None:
        """header_of the expanded container, without copying a compact block's payload."""
        if not len(raw) or raw[0] not in ct.COMPACT_TAGS:
            return header_of(raw)
        fields = self._compact_fields(h, raw)
        return None if fields is None else header_of(ct.keyed_header(fields[0], bytes(h), fields[1]))

    def _compact_fields(self, h: bytes, raw) -> tuple[int, bytes, tuple[bytes, int] | None] | None:
        """(plaintext length, model fingerprint, (dictionary id, its offset in the payload) or
        None) of the compact container `raw` kept under key h; None if it cannot be expanded
        (damaged fields, a model or dictionary number the store does not know, a payload that
        does not say where its dictionary id goes, a key that is not a blake3 digest)."""
        try:
            number, dnum, length, pos = ct.compact_fields(raw)
        except ContainerError:
            return None
        fp = self.model_number_fingerprint(number)
        if fp is None or len(h) != ct.KEY_SIZE:
            return None
        if dnum is None:
            return length, fp, None
        did = self.dictionary_number_id(dnum)
        at = dictionary_offset(memoryview(raw)[pos:])
        if did is None or at is None:
            return None
        return length, fp, (did, at)

    def _at_rest(self, h: bytes, blob):
        """What the blocks table keeps for container `blob` of block h: an LM container compact
        (format 3), anything else as it is. A keyed container is taken only under its own key."""
        if "modelnums" not in self.db or not len(blob) or blob[0] in ct.COMPACT_TAGS:
            return blob
        if len(blob) > 5 and blob[4] == CONTAINER_FORMAT and blob[:4] == CONTAINER_MAGIC and blob[5] != LM:
            return blob  # its fixed prefix says zstd or raw: every block of a write, unparsed
        head = header_of(blob)
        if head is None or head.codec_id != LM or not head.fingerprint:
            return blob
        if head.key and head.key != bytes(h):
            raise ValueError("a keyed container stored under another block's key")
        dictionary = None
        if "dictnums" in self.db:  # format 4: a dictionary id at rest becomes its number
            payload = memoryview(blob)[head.payload_offset :]
            at = dictionary_offset(payload)
            if at is not None and len(payload) >= at + ct.DICTIONARY_ID_SIZE:
                did = bytes(payload[at : at + ct.DICTIONARY_ID_SIZE])
                dictionary = (self.dictionary_number(did), at)
        return ct.compact(head, blob, self.model_number(head.fingerprint), dictionary)

    def model_number_fingerprint(self, number: int) -> bytes | None:
        """The fingerprint the store-local model `number` stands for (None: not in modelnums)."""
        return self._numbered("modelnums", number, FINGERPRINT_SIZE)

    def model_numbers(self) -> dict[int, bytes]:
        """store-local model number -> fingerprint (format 3; {} before)"""
        return self._numbering("modelnums")

    def model_number(self, fingerprint: bytes) -> int:
        """The store-local number of the model `fingerprint`, handed out (the next free number)
        if it has none yet."""
        return self._number_of("modelnums", fingerprint)

    def dictionary_number_id(self, number: int) -> bytes | None:
        """The dictionary id the store-local dictionary `number` stands for (None: not in
        dictnums)."""
        return self._numbered("dictnums", number, ct.DICTIONARY_ID_SIZE)

    def dictionary_numbers(self) -> dict[int, bytes]:
        """store-local dictionary number -> dictionary id (format 4; {} before)"""
        return self._numbering("dictnums")

    def dictionary_number(self, did: bytes) -> int:
        """The store-local number of dictionary `did`, handed out (the next free number) if it
        has none yet."""
        return self._number_of("dictnums", did)

    def lost_model_number(self, h: bytes) -> int | None:
        """The model number of compact block h if modelnums lacks it although the store handed
        it out (numbers are given densely from 0 and never deleted: one below the highest given
        was lost from the table, so the table is damaged, not the block); else None."""
        fields = self._raw_compact_fields(h, ct.COMPACT_TAGS)
        if fields is None or self.model_number_fingerprint(fields[0]) is not None:
            return None
        return fields[0] if fields[0] < max(self.model_numbers(), default=-1) else None

    def lost_dictionary_number(self, h: bytes) -> int | None:
        """The dictionary number of compact block h if dictnums lacks it although the store
        handed it out (below the highest given, as lost_model_number); else None."""
        fields = self._raw_compact_fields(h, (ct.COMPACT_DICT_TAG,))
        if fields is None or fields[1] is None or self.dictionary_number_id(fields[1]) is not None:
            return None
        return fields[1] if fields[1] < max(self.dictionary_numbers(), default=-1) else None

    def _raw_compact_fields(self, h: bytes, tags) -> tuple | None:
        """compact_fields of block h as stored, if it is a compact block with one of `tags` whose
        fields parse; else None."""
        raw = self.txn.get(h, db=self.db["blocks"])
        if raw is None or not len(raw) or raw[0] not in tags:
            return None
        try:
            return ct.compact_fields(raw)
        except ContainerError:
            return None

    # The store-local numbering tables (modelnums, dictnums: u32 number -> a fixed-size value;
    # numbers given densely from 0, never deleted), cached per transaction in self._numbers.
    def _numbered(self, table: str, number: int, size: int) -> bytes | None:
        key = (table, number)
        if key not in self._numbers:
            raw = None
            if table in self.db and number < (1 << 32):
                raw = self.txn.get(_U32.pack(number), db=self.db[table])
            self._numbers[key] = bytes(raw) if raw is not None and len(raw) == size else None
        return self._numbers[key]

    def _numbering(self, table: str) -> dict[int, bytes]:
        if table not in self.db:
            return {}
        with self.txn.cursor(db=self.db[table]) as cur:
            return {_U32.unpack(k)[0]: bytes(v) for k, v in cur}

    def _number_of(self, table: str, value: bytes) -> int:
        numbers = self._numbering(table)
        for n, v in numbers.items():
            if v == value:
                return n
        n = max(numbers, default=-1) + 1
        self.txn.put(_U32.pack(n), bytes(value), db=self.db[table])
        self._numbers[(table, n)] = bytes(value)
        return n

    def container_codec(self, h: bytes) -> int | None:
        """The codec id of block h's container, read from its header only (None: not stored, or
        a damaged header). Asked of every block a flush finds already stored (codec_of: the
        fixed prefix of a current container is enough)."""
        raw = self.txn.get(h, db=self.db["blocks"])
        if raw is None:
            return None
        try:
            codec_id = codec_of(raw)
        except ContainerError:
            return None
        return codec_id if codec_id < _N_CODECS else None

    def plain_length(self, h: bytes) -> int | None:
        """The plaintext length of block h, read from its container's header only (None: not
        stored, or a damaged header)."""
        head = self.header(h)
        return head.length if head is not None else None

    def refcount(self, h: bytes) -> int:
        raw = self.txn.get(h, db=self.db["refs"])
        return _U64.unpack(raw)[0] if raw is not None else 0

    def set_block(
        self,
        ino: int,
        index: int,
        h: bytes | None,
        container: bytes | None = None,
        codec_id: int = 0,
        plain_len: int = 0,
        pending: bool = False,
    ) -> None:
        """Point block `index` of `ino` at `h` (None: a hole). When `h` is new to the store,
        `container` (its encoding) is stored with it. Keeps refs and counters exact."""
        bm = self.db["blockmap"]
        key = blockmap_key(ino, index)
        old = self.txn.get(key, db=bm)
        old = bytes(old) if old is not None else None
        if (
            h is not None
            and container is not None
            and self.refcount(h)
            and self.container_codec(h) == DAMAGED
        ):
            self.replace_container(h, container)  # its content again: heal the block
        if old == h:
            return
        if h is not None:
            n = self.refcount(h)
            if n == 0:
                if container is None:
                    raise ValueError("new block without its container")
                container = self._at_rest(h, container)
                self.txn.put(h, container, db=self.db["blocks"])
                self.new_bytes += len(container)
                row = self.counters.per_codec[codec_id]
                row[0] += 1
                row[1] += plain_len
                row[2] += len(container)
                if pending:
                    self.txn.put(h, _I64.pack(now_ns()), db=self.db["pending"])
            self.txn.put(h, _U64.pack(n + 1), db=self.db["refs"])
            self.txn.put(key, h, db=bm)
        else:
            self.txn.delete(key, db=bm)
        if old is not None:
            self._decref(old)

    def _decref(self, h: bytes) -> None:
        self.set_refcount(h, self.refcount(h) - 1)

    def set_refcount(self, h: bytes, n: int) -> None:
        """Set a block's reference count; at 0 the block is deleted (counters kept exact)."""
        if n > 0:
            self.txn.put(h, _U64.pack(n), db=self.db["refs"])
            return
        self.txn.delete(h, db=self.db["refs"])
        blob = self.txn.get(h, db=self.db["blocks"])
        if blob is not None:
            self._count(h, blob, -1)
            self.txn.delete(h, db=self.db["blocks"])
        self.txn.delete(h, db=self.db["pending"])

    def replace_container(self, h: bytes, blob: bytes) -> None:
        """Store another encoding of block h (compaction); the counters move between codecs."""
        old = self.txn.get(h, db=self.db["blocks"])
        if old is None:
            raise KeyError(h.hex())
        blob = self._at_rest(h, blob)
        self._count(h, old, -1)
        self._count(h, blob, 1)
        self.txn.put(h, blob, db=self.db["blocks"])
        self.new_bytes += len(blob)

    def kept_longer(self, h: bytes, raw=None) -> bool:
        """Whether LM block h is kept in a longer form than this store keeps one now: a full
        container from before format 3, or a compact one that still carries its dictionary's
        8-byte id from before format 4 (`restore_shorter` rewrites it). Reads the header and
        the payload's first bytes only; `raw`: the block as stored, when the caller has it."""
        if raw is None:
            raw = self.txn.get(h, db=self.db["blocks"])
        if raw is None or not len(raw) or "modelnums" not in self.db:
            return False
        if raw[0] == ct.COMPACT_TAG:
            if "dictnums" not in self.db:
                return False
            try:
                pos = ct.compact_fields(raw)[3]
            except ContainerError:
                return False
            return dictionary_offset(memoryview(raw)[pos:]) is not None
        if raw[0] in ct.COMPACT_TAGS:
            return False
        head = header_of(raw)
        return head is not None and head.codec_id == LM and bool(head.fingerprint)

    def restore_shorter(self, h: bytes) -> int:
        """Keep block h in the shortest form this store keeps it in (kept_longer): the same
        container to every reader, fewer bytes at rest; the counters follow. Returns the bytes
        saved (0: already as short, or a block that cannot be expanded — damaged — left alone)."""
        raw = self.txn.get(h, db=self.db["blocks"])
        if raw is None or not self.kept_longer(h, raw):
            return 0
        full = bytes(self._expand(h, raw))
        if len(full) and full[0] in ct.COMPACT_TAGS:
            return 0  # fields that do not expand: fsck's to report
        try:
            short = self._at_rest(h, full)
        except ValueError:  # a keyed container under another key: fsck's to report
            return 0
        if len(short) >= len(raw):
            return 0
        self._count(h, raw, -1)
        self._count(h, short, 1)
        saved = len(raw) - len(short)
        self.txn.put(h, short, db=self.db["blocks"])
        self.new_bytes += len(short)
        return saved

    def _count(self, h: bytes, blob, sign: int) -> None:
        """Add (sign 1) or remove (-1) a container, as kept at rest, in the counters. A damaged
        header does not say how the block was counted: it is left out, and the counters stay off
        until recounted."""
        head = self._header(h, blob)
        if head is None:
            return
        row = self.counters.per_codec[head.codec_id]
        row[0] += sign
        row[1] += sign * head.length
        row[2] += sign * len(blob)

    def remove_pending(self, h: bytes) -> None:
        self.txn.delete(h, db=self.db["pending"])

    def add_model(self, fingerprint: bytes, spec: str) -> None:
        self.txn.put(fingerprint, spec.encode(), db=self.db["models"])

    def model_spec(self, fingerprint: bytes) -> str | None:
        raw = self.txn.get(fingerprint, db=self.db["models"])
        if raw is None:  # a key written before container format 2: the 16-byte fingerprint
            with self.txn.cursor(db=self.db["models"]) as cur:
                if cur.set_range(fingerprint) and bytes(cur.key()).startswith(fingerprint):
                    raw = cur.value()
        return bytes(raw).decode() if raw is not None else None

    def models(self) -> dict[bytes, str]:
        """fingerprint (container.FINGERPRINT_SIZE bytes, also for keys stored longer) -> spec"""
        with self.txn.cursor(db=self.db["models"]) as cur:
            return {bytes(k)[:FINGERPRINT_SIZE]: bytes(v).decode() for k, v in cur}

    # -- model files (format 2) ----------------------------------------------------------------
    def put_model_file(self, digest: bytes, blob, fingerprints) -> None:
        """Store a model file (once: its digest is its key) and point `fingerprints` at it."""
        if self.txn.get(digest, db=self.db["modelfiles"]) is None:
            self.txn.put(digest, blob, db=self.db["modelfiles"])
        for fp in fingerprints:
            self.txn.put(bytes(fp), digest, db=self.db["modelkeys"])

    def model_file(self, digest: bytes):
        """The model file stored under `digest` (a memoryview inside a buffers=True transaction:
        copy what must outlive it), or None."""
        if "modelfiles" not in self.db:
            return None
        return self.txn.get(digest, db=self.db["modelfiles"])

    def model_file_digests(self) -> list[bytes]:
        if "modelfiles" not in self.db:
            return []
        with self.txn.cursor(db=self.db["modelfiles"]) as cur:
            return [bytes(k) for k in cur.iternext(values=False)]

    def model_key(self, fingerprint: bytes) -> bytes | None:
        """The digest of the model file that decodes blocks of this fingerprint, or None."""
        if "modelkeys" not in self.db:
            return None
        raw = self.txn.get(fingerprint, db=self.db["modelkeys"])
        return bytes(raw) if raw is not None else None

    def model_keys(self) -> dict[bytes, bytes]:
        """fingerprint -> model file digest"""
        if "modelkeys" not in self.db:
            return {}
        with self.txn.cursor(db=self.db["modelkeys"]) as cur:
            return {bytes(k): bytes(v) for k, v in cur}

    def delete_model_file(self, digest: bytes) -> None:
        """Drop a model file and every fingerprint that names it (retiring a model)."""
        for fp, d in self.model_keys().items():
            if d == digest:
                self.txn.delete(fp, db=self.db["modelkeys"])
        self.txn.delete(digest, db=self.db["modelfiles"])

    # LM dictionaries (codec/lm/dictionary.py), content-addressed in the meta table: "dict:" + id
    # -> the dictionary's serialized form; "dictionary" -> the id new LM blocks continue.
    def put_dictionary(self, did: bytes, blob: bytes) -> None:
        self.set_meta("dict:" + did.hex(), bytes(blob))

    def dictionaries(self) -> dict[bytes, bytes]:
        """id -> serialized dictionary, every one the store holds."""
        out = {}
        for key in self._prefix_keys(self.db["meta"], b"dict:"):
            out[bytes.fromhex(key[5:].decode())] = bytes(self.txn.get(key, db=self.db["meta"]))
        return out

    def current_dictionary(self) -> bytes | None:
        """The id new LM blocks continue (set by `llmfs tune`); None: no dictionary."""
        v = self.meta("dictionary")
        return bytes(v) if v else None

    def set_current_dictionary(self, did: bytes) -> None:
        self.set_meta("dictionary", bytes(did))

    def dictionary_classes(self) -> bytes | None:
        """The serialized classes new LM blocks pick their dictionary from (None: the current
        dictionary alone)."""
        v = self.meta("dictclasses")
        return bytes(v) if v else None

    def set_dictionary_classes(self, blob: bytes | None) -> None:
        if blob is None:
            self.txn.delete(b"dictclasses", db=self.db["meta"])
        else:
            self.set_meta("dictclasses", bytes(blob))

    def truncate_blocks(self, ino: int, n_blocks: int) -> None:
        """Drop the block map entries of `ino` at index >= n_blocks."""
        doomed = list(self.block_hashes(ino, n_blocks, (1 << 64) - 1))
        for idx in doomed:
            self.set_block(ino, idx, None)

    def blockmap_entries(self):
        with self.txn.cursor(db=self.db["blockmap"]) as cur:
            for key, val in cur:
                ino, idx = _PAIR.unpack(key)
                yield ino, idx, bytes(val)

    def blocks(self):
        """(hash, container) of every block, compact ones expanded (see the schema's `blocks`)."""
        with self.txn.cursor(db=self.db["blocks"]) as cur:
            for key, val in cur:
                yield bytes(key), bytes(self._expand(key, val))

    def blocks_at_rest(self):
        """(hash, the block as the blocks table keeps it: compact ones not expanded) of every
        block; no copies in a read(buffers=True) transaction."""
        with self.txn.cursor(db=self.db["blocks"]) as cur:
            for key, val in cur:
                yield bytes(key), val

    def block_headers(self):
        """(hash, header or None if damaged, bytes at rest) of every block, no payload copied."""
        with self.txn.cursor(db=self.db["blocks"]) as cur:
            for key, val in cur:
                yield bytes(key), self._header(key, val), len(val)

    def refs(self):
        with self.txn.cursor(db=self.db["refs"]) as cur:
            for key, val in cur:
                yield bytes(key), _U64.unpack(val)[0]

    def pending(self):
        with self.txn.cursor(db=self.db["pending"]) as cur:
            for key, val in cur:
                yield bytes(key), _I64.unpack(val)[0]

    # -- xattrs --------------------------------------------------------------------------------
    def xattr(self, ino: int, name: bytes) -> bytes | None:
        raw = self.txn.get(ino_key(ino) + name, db=self.db["xattrs"])
        return bytes(raw) if raw is not None else None

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.txn.put(ino_key(ino) + name, value, db=self.db["xattrs"])

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        return self.txn.delete(ino_key(ino) + name, db=self.db["xattrs"])

    def any_xattrs(self) -> bool:
        """Whether any file has an extended attribute (the namespace's hint: llmfs/namespace.py)."""
        with self.txn.cursor(db=self.db["xattrs"]) as cur:
            return cur.first()

    def xattr_names(self, ino: int) -> list[bytes]:
        prefix = ino_key(ino)
        return [bytes(k[8:]) for k in self._prefix_keys(self.db["xattrs"], prefix)]

    def _prefix_keys(self, db, prefix: bytes):
        with self.txn.cursor(db=db) as cur:
            if not cur.set_range(prefix):
                return []
            keys = []
            for key in cur.iternext(values=False):
                if key[: len(prefix)] != prefix:
                    break
                keys.append(bytes(key))
            return keys

    # -- commit --------------------------------------------------------------------------------
    def _finish(self) -> None:
        if self.write and self._counters is not None:
            self.set_meta("counters", self._counters.pack())


def codec_of(blob) -> int:
    """The codec id of a stored container, from its fixed prefix (magic, format version, codec
    id; a compact block's tag), without parsing the rest of the header; anything else is parsed
    whole (ContainerError if it is damaged)."""
    if len(blob) > 5 and blob[4] == CONTAINER_FORMAT and blob[:4] == CONTAINER_MAGIC:
        return blob[5]
    if len(blob) and blob[0] in ct.COMPACT_TAGS:
        return LM  # a compact block (format 3-4): only LM containers are made compact
    return peek_header(blob).codec_id


def header_of(blob) -> Header | None:
    """The container's header, or None if it is damaged (or names a codec counters cannot hold)."""
    try:
        head = peek_header(blob)
    except ContainerError:
        return None
    return head if head.codec_id < _N_CODECS else None


class _Reading:
    """The context of Store.read(): a class rather than a generator-based context manager,
    because a small file's requests enter it about ten times each, where contextlib's generator
    machinery cost more than the LMDB lookups inside. With a group, the group's transaction
    under the store's lock (g.txn is None only while paused or stopped: then a plain read)."""

    __slots__ = ("_store", "_buffers", "_txn", "_locked")

    def __init__(self, store: Store, buffers: bool):
        self._store = store
        self._buffers = buffers
        self._txn: lmdb.Transaction | None = None
        self._locked = False

    def __enter__(self) -> Txn:
        store = self._store
        if store._group is not None:
            store._lock.acquire()
            g = store._group
            txn = store._active or (g.txn if g is not None else None)
            if txn is not None:
                self._locked = True
                return Txn(store, txn, write=False)
            store._lock.release()
        txn = self._txn = store.env.begin(buffers=self._buffers)
        return Txn(store, txn, write=False)

    def __exit__(self, *exc) -> None:
        if self._locked:
            self._locked = False
            self._store._lock.release()
        elif self._txn is not None:
            txn, self._txn = self._txn, None
            txn.abort()  # a read-only transaction: nothing to commit


class Store:
    def __init__(self, path: str, lock: bool = True, readonly: bool = False):
        """Open an existing store. `lock` takes the store's exclusive lock (mount, fsck --repair);
        StoreLocked if another process holds it."""
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path) or not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise NotAStore(
                f"{path} is not an llmfs store (no data.mdb); create one with `llmfs mkfs {path}`"
            )
        self._lock_fd = None
        self._lock = threading.RLock()
        self._group: _Group | None = None
        self._active: lmdb.Transaction | None = None  # the write() child open now (group mode)
        if lock:
            self._take_lock()
        try:
            self.env = lmdb.open(
                self.path,
                map_size=MAP_SIZE,
                max_dbs=len(DB_NAMES + LATER_DBS),
                subdir=True,
                sync=True,
                metasync=False,
                readonly=readonly,
                create=False,
                max_readers=512,
            )
        except lmdb.Error as e:
            self.release_lock()
            raise NotAStore(f"{path} is not an llmfs store: {e}") from None
        try:
            self.db = {n: self.env.open_db(n.encode(), create=False) for n in DB_NAMES_V1}
        except lmdb.Error:
            self.env.close()
            self.release_lock()
            raise NotAStore(f"{path} is an LMDB environment but not an llmfs store") from None
        with self.read() as t:
            magic, version = t.meta("magic"), t.meta("format")
            block_size, model = t.meta("block_size"), t.meta("model")
        version = _U32.unpack(version)[0] if version and len(version) == 4 else None
        if magic != MAGIC or version is None:
            self.close()
            raise NotAStore(f"{path} is not an llmfs store (bad magic)")
        if version not in READS_FORMATS:
            self.close()
            raise UnsupportedFormat(
                f"{path} has store format version {version}; this llmfs reads versions "
                f"{', '.join(map(str, READS_FORMATS))}: install a newer llmfs to use it"
            )
        try:
            self._open_format(version, upgrade=lock and not readonly)
        except lmdb.Error as e:
            self.close()
            raise NotAStore(f"{path}: format {version} store lacks its tables ({e})") from None
        self._open_later_tables(create=lock and not readonly and self.format == FORMAT_VERSION)
        self.block_size = _U32.unpack(block_size)[0]
        self.model_spec = (model or b"").decode()

    def _open_later_tables(self, create: bool) -> None:
        """Open LATER_DBS; a missing one is created when this process may write (a store made
        before it existed), else left out (its Txn methods read it as empty)."""
        for n in LATER_DBS:
            try:
                self.db[n] = self.env.open_db(n.encode(), create=False)
            except lmdb.NotFoundError:
                if create:
                    with self.env.begin(write=True) as txn:
                        self.db[n] = self.env.open_db(n.encode(), txn=txn, create=True)
                    self.env.sync(True)

    def _open_format(self, version: int, upgrade: bool) -> None:
        """Open the format's tables; upgrade a format 1-4 store to 5 in one transaction when this
        process holds the lock (see FORMAT VERSIONS above), else read it as it is."""
        self.format = version
        have = {1: DB_NAMES_V1, 2: DB_NAMES_V2, 3: DB_NAMES_V3}.get(version, DB_NAMES)  # 4, 5: all
        for n in have[len(DB_NAMES_V1) :]:
            self.db[n] = self.env.open_db(n.encode(), create=False)
        if version == FORMAT_VERSION or not upgrade:
            return
        with self.env.begin(write=True) as txn:
            for n in DB_NAMES[len(have) :]:
                self.db[n] = self.env.open_db(n.encode(), txn=txn, create=True)
            txn.put(b"format", _U32.pack(FORMAT_VERSION), db=self.db["meta"])
        self.env.sync(True)
        self.format = FORMAT_VERSION

    @classmethod
    def create(cls, path: str, block_size: int, model_spec: str = "") -> None:
        """mkfs: a new empty store with a root directory owned by the caller."""
        if os.path.exists(os.path.join(path, "data.mdb")):
            raise StoreError(f"{path} already holds a store; refusing to overwrite it")
        if block_size < 4096 or block_size > (1 << 24) or block_size & (block_size - 1):
            raise StoreError("block size must be a power of two between 4 KiB and 16 MiB")
        # Private whatever the umask: data.mdb holds every file's data and names, which the
        # mount's mode checks do not guard (`llmfs mount` refuses or fixes a store others can read).
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=len(DB_NAMES + LATER_DBS), subdir=True, mode=0o600)
        dbs = {n: env.open_db(n.encode()) for n in DB_NAMES + LATER_DBS}
        t = now_ns()
        root = Inode(stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), 2, 0, t, t, t)
        with env.begin(write=True) as txn:
            m = dbs["meta"]
            txn.put(b"magic", MAGIC, db=m)
            txn.put(b"format", _U32.pack(FORMAT_VERSION), db=m)
            txn.put(b"block_size", _U32.pack(block_size), db=m)
            txn.put(b"model", model_spec.encode(), db=m)
            txn.put(b"next_ino", _U64.pack(ROOT_INO + 1), db=m)
            txn.put(b"clean", b"1", db=m)
            txn.put(b"counters", Counters.zero().pack(), db=m)
            txn.put(b"created", _I64.pack(t), db=m)
            txn.put(ino_key(ROOT_INO), root.pack(), db=dbs["inodes"])
        env.sync(True)
        env.close()
        for name in ("data.mdb", "lock.mdb"):
            os.chmod(os.path.join(path, name), 0o600)

    # -- locking -------------------------------------------------------------------------------
    def _take_lock(self) -> None:
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise StoreLocked(
                f"store {self.path} is in use ({holder or 'another process'}); unmount it first"
            ) from None
        self._lock_fd = fd

    def describe_lock_holder(self, text: str) -> None:
        """Write who holds the lock (pid, mount point) into the lock file for error messages."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, text.encode(), 0)

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- transactions --------------------------------------------------------------------------
    def read(self, buffers: bool = False) -> _Reading:
        """A read snapshot (`with store.read() as t:`). buffers=True hands out values as
        memoryviews into the map, valid only inside the transaction: for callers that look at a
        few bytes of large values (headers). With a group, the group's transaction (it sees the
        changes not yet committed)."""
        return _Reading(self, buffers)

    @contextlib.contextmanager
    def snapshot(self):
        """The last committed state, read-only, its values memoryviews into the map (valid only
        inside the block). Unlike read(), never the open group: it does not see the changes the
        group holds, and it takes no lock of ours, so its values may be decoded in place for as
        long as the block lasts while other threads read and write. For content-addressed blocks:
        a container found here holds its hash's plaintext whatever the group did since (a block
        named now that is new in the group is not here; read() has it)."""
        with self.env.begin(buffers=True) as txn:
            yield Txn(self, txn, write=False)

    @contextlib.contextmanager
    def write(self):
        """One atomic change: a write transaction, or with a group a child transaction of it."""
        with self._lock:
            g = self._group
            if g is not None:
                if g.failed:
                    raise StoreIOError(g.failed)
                self._check_space(g)
            parent = g.txn if g is not None else None
            txn = self.env.begin(write=True, parent=parent)
            t = Txn(self, txn, write=True)
            self._active = txn
            try:
                yield t
                t._finish()
                txn.commit()
            except lmdb.MapFullError:
                txn.abort()
                raise StoreFull("the store's map is full") from None
            except lmdb.Error as e:
                txn.abort()
                # LMDB reports a short write as EIO ("mdb_txn_commit: Input/output error"), and
                # a full disk writes short: look at the disk before blaming it.
                if self.disk_free() < FULL_DISK_SLACK or "No space left" in str(e):
                    raise StoreFull(f"no space left on the store's disk ({e})") from None
                raise StoreIOError(f"the store could not be written: {e}") from None
            except BaseException:
                txn.abort()
                raise
            finally:
                self._active = None
            if g is not None:
                g.changes += 1  # (a write of the paused mode is made durable by a sync too)
            if parent is not None:
                g.bytes += t.new_bytes
                if g.first_change is None:
                    g.first_change = time.monotonic()
                    g.cond.notify_all()
                elif g.bytes >= g.max_bytes:
                    g.cond.notify_all()

    def sync(self) -> None:
        """Make every change made so far durable."""
        g = self._group
        if g is not None:
            with self._lock:
                target = g.changes
                while g.durable < target and not g.failed and g.thread.is_alive():
                    g.wanted = max(g.wanted, target)
                    g.cond.notify_all()
                    g.cond.wait(1.0)
                if g.failed:
                    raise StoreIOError(g.failed)
                if g.durable >= target:
                    return
        self._sync_env()

    def _sync_env(self) -> None:
        try:
            self.env.sync(True)
        except lmdb.Error as e:
            if self.disk_free() < FULL_DISK_SLACK:
                raise StoreFull(f"no space left on the store's disk ({e})") from None
            raise StoreIOError(f"the store could not be synced: {e}") from None

    # -- group commit ----------------------------------------------------------------------------
    def start_group_commit(
        self, interval: float = COMMIT_INTERVAL, drain: float = DRAIN, max_bytes: int = GROUP_BYTES
    ) -> None:
        """Collect changes in groups committed by a thread of their own (GROUP COMMIT above)."""
        with self._lock:
            if self._group is not None:
                return
            g = self._group = _Group(self._lock, interval, drain, max_bytes)
            g.thread = threading.Thread(target=self._committer, args=(g,), name="llmfs-commit", daemon=True)
            g.thread.start()
            while g.txn is None and g.thread.is_alive() and not g.low_space:
                g.cond.wait(0.1)

    def stop_group_commit(self) -> None:
        """Commit and sync what the group holds, and go back to one commit per write()."""
        g = self._group
        if g is None:
            return
        with self._lock:
            g.stop = True
            g.cond.notify_all()
        g.thread.join()
        with self._lock:
            self._group = None
            if g.failed:
                raise StoreIOError(g.failed)

    def hold(self) -> None:
        """A change is under way that should reach the store whole (a file open for writing):
        a timed commit waits a little (DRAIN) for the holds to end."""
        g = self._group
        if g is None:
            return
        with self._lock:
            if g.draining:
                g.cond.wait_for(lambda: not g.draining, g.drain)
            g.holds += 1

    def unhold(self) -> None:
        g = self._group
        if g is None:
            return
        with self._lock:
            g.holds = max(0, g.holds - 1)
            if not g.holds and g.draining:  # only a draining commit waits for this; waking
                g.cond.notify_all()  # the committer on every close costs a thread switch

    def commits_later(self) -> bool:
        """Whether a change made now joins a group that is committed later, so that it cannot
        fail for want of disk space now (the group mode, not paused for low space; the space is
        looked at as a write() would). False without a group: every change commits at once."""
        g = self._group
        if g is None or g.failed:
            return False
        with self._lock:
            self._check_space(g)
            return g.txn is not None and not g.low_space

    def _check_space(self, g: _Group) -> None:
        """Pause the group mode (commit now, then one commit per write) while the disk is low."""
        now = time.monotonic()
        if now - g.space_checked < SPACE_CHECK:
            return
        g.space_checked = now
        low = self.disk_free() < LOW_SPACE
        if low != g.low_space:
            g.low_space = low
            g.cond.notify_all()
            if low:  # wait for the committer to close the group: this write commits itself
                g.cond.wait_for(lambda: g.txn is None or g.failed or g.stop, 10)

    def _committer(self, g: _Group) -> None:
        """The thread that owns the group transactions: begins, commits and syncs them."""
        with self._lock:
            try:
                while True:
                    self._begin_group(g)
                    due = self._group_due(g)
                    if due is None:
                        g.cond.wait(self._group_wait(g))
                        continue
                    if due == "timed" and g.holds and g.drain > 0:
                        g.draining = True
                        g.cond.wait_for(lambda: not g.holds or g.stop, g.drain)
                        g.draining = False
                        g.cond.notify_all()
                    self._commit_group(g)
                    if g.stop or g.failed:
                        return
            except BaseException as e:  # never leave sync() callers waiting for a dead thread
                g.failed = g.failed or f"the store's commit thread failed: {e!r}"
                log.critical("%s", g.failed)
                raise
            finally:
                if g.txn is not None:
                    g.txn.abort()
                    g.txn = None
                g.cond.notify_all()

    def _begin_group(self, g: _Group) -> None:
        if g.txn is None and not g.low_space and not g.stop and not g.failed:
            g.txn = self.env.begin(write=True)
            g.cond.notify_all()

    def _group_due(self, g: _Group) -> str | None:
        if g.stop or g.failed:
            return "stop"
        if g.txn is not None and g.low_space:
            return "space"
        if g.wanted > g.durable:
            return "sync"
        if g.first_change is None:
            return None
        if g.bytes >= g.max_bytes:
            return "size"
        if time.monotonic() - g.first_change >= g.interval:
            return "timed"
        return None

    def _group_wait(self, g: _Group) -> float | None:
        if g.first_change is None:
            return None
        return max(0.0, g.first_change + g.interval - time.monotonic())

    def _commit_group(self, g: _Group) -> None:
        """Commit the open group and sync the environment. Called with the lock held; a new group
        is open while the sync runs without the lock, so writers wait only for the commit."""
        target = g.changes
        txn, g.txn = g.txn, None
        g.first_change, g.bytes = None, 0
        try:
            if txn is not None:
                txn.commit()
            self._begin_group(g)
            g.cond.release()
            try:
                self.env.sync(True)  # the commit wrote its meta page without a sync
            finally:
                g.cond.acquire()
            g.durable = max(g.durable, target)
        except lmdb.Error as e:
            g.failed = (
                f"the store could not commit the changes of the last "
                f"{COMMIT_INTERVAL:g} s ({e}); they are lost, and the store accepts no "
                f"more writes until it is mounted again"
            )
            log.critical("%s", g.failed)
        g.cond.notify_all()

    def disk_free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    # -- helpers -------------------------------------------------------------------------------
    def set_clean(self, clean: bool) -> None:
        with self.write() as t:
            t.set_meta("clean", b"1" if clean else b"0")
        self.sync()

    def was_clean(self) -> bool:
        with self.read() as t:
            return t.meta("clean") == b"1"

    def close(self) -> None:
        try:
            self.stop_group_commit()
        except StoreError:
            pass  # logged by the committer; closing must still release the store
        self.env.close()
        self.release_lock()
