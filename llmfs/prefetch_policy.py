"""What the filesystem decodes ahead of its readers: the policy. The mechanism — a background
worker that decodes batches of LM blocks into the decode cache, single-flight with readers — is
llmfs/cache (cache/prefetch.py, cache/readahead.py); this module decides which blocks to name.

- Opening a hot file (at most HOT_FILE_FRACTION of the cache's RAM) names all its LM blocks, decoded
  as one batch ahead of the reader. A larger file would be evicted from the cache's first stage
  before it is read, so it gets readahead only.
- A reader that walks a directory in name order (cp -r, tar, grep -r, rsync: it opens the next
  regular file after the one it opened last) gets the LM blocks of the next small files named in
  the same batch: an LM decode costs about the same for one segment as for a batch of them, and a
  cold tree of small files otherwise decodes one tiny batch per file.
- A sequential reader gets readahead (cache/readahead.py decides how far).
Only LM blocks are named: zstd and raw blocks decode faster than a prefetch could help.

Only what the opener could read is named: a sibling file whose mode does not let the opener's
credentials read it (owner, group or other bits, as the kernel's default_permissions check does;
root reads everything) is skipped. Its decoded blocks would otherwise sit in the shared cache on
another user's behalf, and how fast that user's next read is would tell whether they are there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from llmfs.codec.registry import LM

from .store import Inode, Store

# Opening an LM-coded file at most this fraction of the cache's RAM budget prefetches all of it:
# prefetched blocks enter the 2Q first stage, a quarter of RAM (cache/policy.py).
HOT_FILE_FRACTION = 0.25
# A directory walk names the LM blocks of the next small files (at most this many blocks each) in
# one batch with the file it opens: up to this many blocks — the prefetcher's batch — from at most
# DIR_PREFETCH_FILES files.
DIR_PREFETCH_BLOCKS = 16
DIR_PREFETCH_FILES = 64
# Where each recently looked-up inode was found (parent, name): open() only gets the inode.
LOOKUPS_KEPT = 4096


@dataclass(frozen=True)
class Credentials:
    """Who opened a file: uid, gid and supplementary groups (uid None: unknown, nobody's)."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | Callable[[], tuple[int, ...]] = ()  # or a function that finds them

    def may_read(self, inode: Inode) -> bool:
        if self.uid == 0:
            return True
        if self.uid is not None and inode.uid == self.uid:
            return bool(inode.mode & 0o400)
        if self.uid is not None and inode.gid == self.gid:
            return bool(inode.mode & 0o040)
        groups = self.groups() if callable(self.groups) else self.groups
        if self.uid is not None and inode.gid in groups:
            return bool(inode.mode & 0o040)
        return bool(inode.mode & 0o004)


class PrefetchPolicy:
    """Names blocks for the decode cache's prefetcher. `cache` is a DecodeCache (or None: no
    prefetching), `readahead` a cache.Readahead (or None), `decode(hashes)` decodes blocks by hash
    from the store (the namespace's batch decode)."""

    def __init__(self, store: Store, cache, readahead, decode: Callable[[list[bytes]], list[bytes]]):
        self.store = store
        self.cache = cache
        self.readahead = readahead
        self.block_size = store.block_size
        self._decode = decode
        self._found: OrderedDict[int, tuple[int, bytes]] = OrderedDict()  # ino -> (parent, name)
        self._found_lock = threading.Lock()  # its own: resolve() runs on every stat

    def remember(self, ino: int, parent: int, name: bytes) -> None:
        """Where ino was found: open() gets only the inode, and its directory tells readahead
        which files a directory walk opens next."""
        if self.readahead is None or name in (b".", b".."):
            return
        with self._found_lock:
            self._found[ino] = (parent, name)
            self._found.move_to_end(ino)
            if len(self._found) > LOOKUPS_KEPT:
                self._found.popitem(last=False)

    def forget(self, ino: int) -> None:
        """The file is no longer open: drop its sequential-read state."""
        if self.readahead is not None:
            self.readahead.forget(ino)

    def on_open(self, ino: int, inode: Inode, who: Credentials = Credentials()) -> None:
        """A regular file was opened by `who`: its blocks if it is hot, and the next files of a
        walk that `who` may read."""
        if self.cache is None:
            return
        hot = self.cache.ram_budget * HOT_FILE_FRACTION
        with self._found_lock:
            where = self._found.get(ino)
        small = min(hot, DIR_PREFETCH_BLOCKS * self.block_size)  # siblings: small files only
        with self.store.read(buffers=True) as t:  # headers only: no 64 KiB copies
            if not t.codec_blocks(LM):
                return  # no LM block in the store: nothing to prefetch, no sibling scan to pay
            start = None
            if where is not None and self.readahead is not None:
                start = self.readahead.open_in_dir(*where, lambda after: self._next_file(t, where[0], after))
            hashes = self._lm_hashes(t, ino, inode.size) if 0 < inode.size <= hot else []
            if start is not None:
                names = []
                for name, child in t.listdir(where[0], after=start):
                    if len(hashes) >= DIR_PREFETCH_BLOCKS or len(names) >= DIR_PREFETCH_FILES:
                        break
                    names.append(name)
                    sibling = t.inode(child)  # a big one gets readahead when read
                    if (
                        sibling is not None
                        and sibling.is_reg
                        and 0 < sibling.size <= small
                        and who.may_read(sibling)
                    ):
                        hashes += self._lm_hashes(t, child, sibling.size)
                self.readahead.named_files(where[0], names)
        if hashes:
            self.cache.prefetch(hashes, self._decode)

    def on_read(self, ino: int, first: int, last: int, size: int) -> None:
        """Blocks first..last of a file of `size` bytes are being read: readahead."""
        if self.readahead is None:
            return
        nblocks = -(-size // self.block_size)
        if last + 1 >= nblocks and first == 0:
            return  # the whole file in one read (every small file): nothing is left to read ahead
        indices = self.readahead.access(ino, first, last, nblocks)
        if self.cache is None or not indices:
            return
        with self.store.read(buffers=True) as t:  # headers only: no 64 KiB copies
            if not t.codec_blocks(LM):
                return  # no LM block in the store: no header to look at (in the group each is a copy)
            hashes = self._lm_hashes(t, ino, 0, indices)
        if hashes:
            self.cache.prefetch(hashes, self._decode)

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
        return [
            h
            for i, h in t.block_hashes(ino, min(wanted), max(wanted)).items()
            if i in wanted and t.container_codec(h) == LM
        ]
