"""Write buffering: the dirty blocks of files being written, and the flush that stores them (the role
of S3QL's BlockCache).

A write lands in its file's dirty buffer of whole blocks (`OpenFile.dirty`, block index -> one
block). A partly written block is first loaded from the store into a bytearray (read-modify-write);
a whole-block write is taken as it is, without a copy: a memoryview of the request's own immutable
bytes (mfusepy hands each request over as a fresh bytes object), turned into a bytearray only if a
later write changes part of it. The flush hashes, checksums and compresses those buffers in place;
the one copy of a block the daemon makes after the request's is its container (a raw block's
header and payload joined), then LMDB's page. Nothing reaches the store until a flush, which happens on
release (the last close of an open file, or a batch of released small files: flush_many and
llmfs/namespace.py's release; close itself only when the disk is nearly full), fsync,
truncate, before a time or xattr change that must not be overwritten, and when all
files' dirty bytes pass `dirty_limit`. One flush is one LMDB write transaction: the file's new
blocks (content-addressed: a block already stored only gains a reference), its block map, size and
times together, so a crash leaves a file as of some flush, never half of one. All-zero blocks are
stored as holes. Blocks are compressed (zstd or raw) before the write transaction opens, so the
store's single writer is never held by compression.

Encoding ahead of the flush. Hashing (blake3), the plaintext checksum (xxh3) and compression (zstd)
are most of the CPU a written MiB costs; zstd and blake3 release the GIL on a block. A whole block
kept as a view of its request's immutable bytes cannot change any more (a later write replaces it
or turns it into a bytearray first), so `write` hands it at once to a small pool of encoder threads
(`encoders`, one per core up to two) and returns: the FUSE thread takes the next WRITE while another
core hashes and compresses, and the flush finds most blocks' hash and container ready and only
waits for the rest and makes the LMDB puts (in its one transaction, as before: the store keeps one
writer, and nothing about when or how data is stored changes — fsync, close and the dirty limit
behave as without the pool). A block whose content is already stored is encoded all the same (the
flush drops the container): asking the store first would take its lock from the encoder threads
while a flush holds it. Partly written blocks (bytearrays, which later writes may change) are
encoded by the flush as before. The work in flight is bounded: at most `dirty_limit` bytes of
blocks are queued or being encoded (beyond that a block is left to its flush), so the pool holds at
most one dirty limit of requests alive (those views are counted below) plus the containers of the
dirty blocks, which the flush made all at once before the pool existed.

The write-time codec stays zstd level 3 (Registry's level, raw when that does not shrink the block).
Compaction recodes cold text with the LM from the plaintext, so for text the level only decides
what the block costs until then (`--compact-after`, or for ever in a store that is never
compacted); but blocks the LM codec calls binary are skipped by compaction and keep their
write-time container for good. A faster level stores text, source and shared libraries a few per
cent larger for a CPU saving that varies with the data (docs/benchmarks.md, session 7); with
compression on the encoder threads that CPU is no longer on the path a WRITE waits for, so a
permanent loss of size is not worth it. Incompressible data is not sampled first: zstd gives up
early on it, and a wrong guess would store a compressible block raw, which compaction never
revisits.

The dirty limit is one bound over all files. `dirty_bytes` counts whole dirty blocks of every file
and changes only under `_acct_lock`, a leaf lock (nothing is taken while it is held), so it is
exact however many files are written at once. Before a write is accepted, `make_room` flushes the
files that were dirtied first (oldest first, any file, the writer's own included) until the new
data fits; it runs with no lock held and takes each file's lock in turn, so it keeps the lock
order (a file's lock, then the namespace lock, then the store's write lock) and cannot deadlock.
What can pass the limit: the writes accepted at the same moment by other threads, each at most
its size rounded up to whole blocks plus one block (a FUSE write is at most 1 MiB: max_write), so memory
stays under dirty_limit + workers x (max write + 2 blocks), doubled at most by whole blocks kept as
views of their requests (write()).

Every method here except `make_room` and `dirty_files` is called with the file's lock
(`OpenFile.lock`) held; the namespace owns the table of open files and the locks
(llmfs/namespace.py).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llmfs.codec.registry import DAMAGED, RAW, ZSTD, Registry

from .errors import NoSpace, NotFound
from .store import Store, StoreFull, block_hash, codec_of, now_ns

# Flush a file once all files' dirty bytes pass this: bounds the daemon's memory for buffered writes.
DIRTY_LIMIT = 64 << 20
# Encoder threads beside the FUSE threads (docstring): hashing and zstd release the GIL, so each
# uses a core; more than two only queue for the GIL's Python parts.
ENCODERS = min(2, os.cpu_count() or 1)


def _name_thread() -> None:
    """Name the calling thread llmfs-encode for the OS (top -H, perf, the benchmark's CPU split)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, b"llmfs-encode", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass  # not Linux: only the name is missing


@dataclass
class OpenFile:
    """In-memory state of a file that is open or being changed: pinned while `users` > 0."""

    ino: int
    size: int
    users: int = 0
    dirty: dict = field(default_factory=dict)  # block index -> bytearray(block_size), or a
    # memoryview of block_size immutable bytes (a whole-block write: writeback docstring)
    mtime: int | None = None  # set when data changed since the last flush
    lock: threading.Lock = field(default_factory=threading.Lock)
    unstored: bool = False  # the store marks it created-but-not-stored (schema: unstored);
    # the flush that first stores it non-empty removes the mark in its own transaction
    unlinked: bool = False  # may have lost its last name (nlink 0): its last user deletes it
    encoding: dict = field(default_factory=dict)  # block index -> (the dirty view, Future of a
    # list of (hash or None for a hole, container), position in it): encoded ahead (docstring)


class WriteBuffer:
    """The dirty blocks of all open files, and their flush to the store.

    `load(ino, idx)` returns the stored plaintext of one block (None for a hole): the namespace's
    read path, so that a partial write of a stored block decodes it with the same checks as a read.
    """

    def __init__(
        self,
        store: Store,
        registry: Registry,
        load: Callable[[int, int], bytes | None],
        dirty_limit: int = DIRTY_LIMIT,
        codecs: tuple[int, ...] = (ZSTD,),
        encoders: int = ENCODERS,
    ):
        self.store = store
        self.registry = registry
        self.block_size = store.block_size
        self.dirty_limit = dirty_limit
        self.codecs = codecs
        self._load = load
        self._zero_hash = block_hash(bytes(self.block_size))  # a whole block of zeros: a hole
        self.dirty_bytes = 0  # all files' buffered bytes: changed only under _acct_lock
        self._acct_lock = threading.Lock()
        self._dirtied: OrderedDict[int, OpenFile] = OrderedDict()  # files with dirty blocks,
        # the first dirtied first
        self.encoders = encoders
        self._pool: ThreadPoolExecutor | None = None  # made on first use: after the daemon forks
        self._pool_lock = threading.Lock()
        self._in_flight = 0  # bytes of blocks queued or being encoded: under _acct_lock

    def _account(self, f: OpenFile, blocks: int) -> None:
        """f gained (or lost, if negative) `blocks` dirty blocks: the only place dirty_bytes changes."""
        with self._acct_lock:
            self.dirty_bytes += blocks * self.block_size
            if f.dirty:
                self._dirtied.setdefault(f.ino, f)
            else:
                self._dirtied.pop(f.ino, None)

    def dirty_files(self) -> list[OpenFile]:
        """The files holding dirty blocks, the first dirtied first."""
        with self._acct_lock:
            return list(self._dirtied.values())

    def make_room(self, incoming: int) -> None:
        """Flush files, the first dirtied first, until `incoming` more bytes fit under the limit.
        Called with no lock held. NoSpace if a flush fails: the write is then refused whole."""
        need = -(-incoming // self.block_size) * self.block_size
        while self.dirty_bytes + need > self.dirty_limit:
            with self._acct_lock:
                oldest = next(iter(self._dirtied.values()), None)
            if oldest is None:
                return
            with oldest.lock:
                self.flush(oldest)

    def write(self, f: OpenFile, data: bytes, offset: int) -> None:
        bs = self.block_size
        if self.dirty_bytes + len(data) > self.dirty_limit and f.dirty:
            # Flush before taking the new data (make_room may have been overtaken by other
            # writers): if the disk is full this write fails whole (ENOSPC) and the bytes
            # already accepted stay buffered for a later flush.
            self.flush(f)
        pos, view = offset, memoryview(data)
        ahead = []  # whole blocks kept as views: encoded ahead, one task per request
        # Whole blocks are kept as views of immutable bytes, not copied, when they are at least half
        # the request: a view holds all of its request alive, so kept views at most double the
        # memory of the dirty blocks they stand for.
        whole = max(0, (offset + len(data)) // bs - -(-offset // bs)) * bs
        keep = isinstance(data, bytes) and 2 * whole >= len(data)
        while view:
            idx, lo = divmod(pos, bs)
            n = min(bs - lo, len(view))
            if n == bs and idx not in f.dirty:  # a whole block: nothing to read first
                f.dirty[idx] = view[:n] if keep else bytearray(view[:n])
                self._account(f, 1)
                if keep:
                    ahead.append(idx)
            elif n == bs and type(f.dirty[idx]) is not bytearray:  # a whole block over a kept one
                f.dirty[idx] = view[:n] if keep else bytearray(view[:n])
                f.encoding.pop(idx, None)
                if keep:
                    ahead.append(idx)
            else:
                self._block(f, idx)[lo : lo + n] = view[:n]
            pos += n
            view = view[n:]
        if ahead:
            self._encode_ahead(f, ahead)
        f.size = max(f.size, offset + len(data))
        f.mtime = now_ns()

    def truncate(self, f: OpenFile, length: int) -> None:
        """Set the file's size (zeros past the old end) and flush."""
        bs = self.block_size
        if length < f.size:
            idx, lo = divmod(length, bs)
            if lo:  # the bytes past the new end of the last block must read as zeros later
                self._block(f, idx)[lo:] = bytes(bs - lo)
            doomed = [i for i in f.dirty if i * bs >= length]
            for i in doomed:
                del f.dirty[i]
                f.encoding.pop(i, None)
            self._account(f, -len(doomed))
        f.size = length
        f.mtime = now_ns()
        self.flush(f)

    def flush(self, f: OpenFile) -> None:
        """Write f's dirty blocks, its size and mtime in one transaction."""
        self.flush_many([f])

    def flush_many(self, files: list[OpenFile], settle: frozenset[int] = frozenset()) -> None:
        """flush() of several files in one transaction (the namespace's batch of released small
        files: one read for deduplication, one child transaction, one counters update for all;
        a block shared by several is encoded once). settle: inodes whose unstored mark ends in
        that transaction even if they stay empty (the release of their creating handle). All or
        nothing: on failure every file keeps its dirty data (the caller may retry them one by
        one). Called with every file's lock held."""
        work = []  # (f, {idx: (hash, plain)}) ; hash None = hole
        encoded = {}  # hash -> container
        for f in files:
            if f.dirty or f.mtime is not None:
                work.append((f, self._hash_blocks(f, encoded)))
        marks = [f for f in files if f.ino in settle and f.unstored]
        if not work and not marks:
            return
        with self.store.read(buffers=True) as t:  # headers only
            known = {
                h
                for _, blocks in work
                for h, _ in blocks.values()  # a quarantined block is stored anew
                if h is not None and t.refcount(h) and t.container_codec(h) != DAMAGED
            }
        for h in known:
            encoded.pop(h, None)  # stored already: it only gains a reference
        for _, blocks in work:  # compress outside the write transaction
            for h, plain in blocks.values():
                if h is not None and h not in known and h not in encoded:
                    encoded[h] = self._encode(plain)
        settled = {}  # ino -> f whose mark ends
        try:
            with self.store.write() as t:
                for f, blocks in work:
                    self._put(t, f, blocks, encoded)
                    if f.unstored and f.size > 0:  # the data and the end of the mark commit together
                        t.remove_unstored(f.ino)
                        settled[f.ino] = f
                for f in marks:
                    if f.ino not in settled:
                        t.remove_unstored(f.ino)
                        settled[f.ino] = f
        except StoreFull as e:
            raise NoSpace(str(e)) from None  # the dirty data stays buffered: nothing is lost
        for f, _ in work:
            n = len(f.dirty)
            f.dirty.clear()
            f.encoding.clear()
            f.mtime = None
            self._account(f, -n)
        for f in settled.values():
            f.unstored = False

    def _hash_blocks(self, f: OpenFile, encoded: dict) -> dict:
        """{idx: (hash or None for a hole, plaintext)} of f's dirty blocks within its size; the
        containers of blocks encoded ahead go into `encoded`."""
        bs = self.block_size
        blocks = {}
        for idx, buf in f.dirty.items():
            n = min(bs, f.size - idx * bs)
            if n <= 0:
                continue
            ahead = f.encoding.get(idx)
            if ahead is not None and ahead[0] is buf and n == bs and not ahead[1].cancelled():
                fut = ahead[1]
                if fut.exception() is None:  # waits; a task that failed is done again below
                    h, blob = fut.result()[ahead[2]]  # encoded ahead (docstring)
                    blocks[idx] = (h, b"" if h is None else buf)
                    if h is not None:
                        encoded[h] = blob
                    continue
            plain = memoryview(buf)[:n]  # no copy: hashed, checksummed and compressed in place
            h = block_hash(plain)
            if h == self._zero_hash if n == bs else not bytes(plain).strip(b"\0"):
                blocks[idx] = (None, b"")  # all zeros (a whole block: by its hash): a hole
            else:
                blocks[idx] = (h, plain)
        return blocks

    def _put(self, t, f: OpenFile, blocks: dict, encoded: dict) -> None:
        """f's blocks, block map, size and times into write transaction t."""
        bs = self.block_size
        for idx, (h, plain) in sorted(blocks.items()):
            blob = encoded.get(h)
            if h is not None and blob is None and not t.refcount(h):
                blob = encoded[h] = self._encode(plain)  # deleted since we looked
            codec_id = codec_of(blob) if blob else RAW  # (encoded here: current format)
            t.set_block(
                f.ino,
                idx,
                h,
                blob,
                codec_id,
                len(plain),
                pending=blob is not None and codec_id != RAW,
            )
        t.truncate_blocks(f.ino, -(-f.size // bs))
        inode = t.inode(f.ino)
        if inode is None:
            raise NotFound(f.ino)
        changes = {"size": f.size}
        if f.mtime is not None:
            changes.update(mtime=f.mtime, ctime=max(f.mtime, inode.ctime))
        t.put_inode(f.ino, inode.evolve(**changes), inode)

    def _block(self, f: OpenFile, idx: int) -> bytearray:
        """The dirty buffer of block idx, loaded from the store on first touch."""
        buf = f.dirty.get(idx)
        if buf is not None and type(buf) is not bytearray:  # a kept whole block, now changed in part
            buf = f.dirty[idx] = bytearray(buf)
            f.encoding.pop(idx, None)
        if buf is None:
            buf = bytearray(self.block_size)
            if idx * self.block_size < f.size:
                plain = self._load(f.ino, idx)
                if plain:
                    buf[: len(plain)] = plain
            f.dirty[idx] = buf
            self._account(f, 1)
        return buf

    def _encode(self, plain: bytes) -> bytes:
        return self.registry.encode(plain, self.codecs)

    # -- encoding ahead (docstring) ---------------------------------------------------------------
    def _prepare(self, bufs: list[memoryview]) -> list[tuple[bytes | None, bytes]]:
        """(hash, container) of whole blocks, (None, b"") for zeros: a pool thread's work."""
        out = []
        for plain in bufs:
            h = block_hash(plain)
            out.append((None, b"") if h == self._zero_hash else (h, self._encode(plain)))
        return out

    def _encode_ahead(self, f: OpenFile, idxs: list[int]) -> None:
        """Queue f's whole, immutable dirty blocks idxs for encoding as one task (one hand-over per
        request, not per block), if the work in flight stays under the dirty limit."""
        size = len(idxs) * self.block_size
        with self._acct_lock:
            if self.encoders <= 0 or self._in_flight + size > self.dirty_limit:
                return  # the flush encodes them
            self._in_flight += size
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.encoders, thread_name_prefix="llmfs-encode", initializer=_name_thread
                    )
        bufs = [f.dirty[i] for i in idxs]
        try:
            fut = self._pool.submit(self._prepare, bufs)
        except RuntimeError:  # shut down (unmount): the flush encodes them
            self._done(size)
            return
        fut.add_done_callback(lambda _: self._done(size))  # also when cancelled
        for k, (i, buf) in enumerate(zip(idxs, bufs)):
            f.encoding[i] = (buf, fut, k)

    def _done(self, size: int) -> None:
        with self._acct_lock:
            self._in_flight -= size

    def close(self) -> None:
        """Stop the encoder threads (unmount, after the last flush)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
            self.encoders = 0  # later flushes (none are expected) encode in place
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
