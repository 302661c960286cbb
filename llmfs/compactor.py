"""Compaction: cold blocks stored by the fast write path (zstd/raw) are re-encoded with the language
model, verified, and swapped in — the step that makes stored text small.

The queue is the store's `pending` table (hash → when the block was stored). A block is a candidate
once it is older than `compact_after`. For each batch of candidates:
  1. read their containers in one read transaction, decode them (zstd: fast);
  2. skip what the LM cannot help, cheaply: blocks the write path had to store raw (incompressible)
     and blocks the LM codec calls binary (it returns None at once);
  3. encode with the LM and zstd; the smallest container wins (registry.encode);
  4. decode the new LM containers again as one batch and compare with the plaintext (the registry
     also checks the stored checksum): a container is swapped in only after it decoded correctly;
     with a remote coder set (`remote`, llmfs/cluster.py) steps 3-4 run on a cluster, each
     container decoded there by another worker than the one that made it; what the cluster could
     not do is done here as above;
  5. one write transaction swaps each verified container in — only if the block is still stored
     with the container we read (a block rewritten meanwhile has a new hash, so newer data always
     wins) — records the model in `models`, and takes the batch off `pending`.
No write transaction is held while the model runs (steps 1–4 hold none).

Damaged blocks: a pending block whose container cannot be read or decoded is reported (logged with
its hash; `llmfs fsck` names its files), counted in Result.damaged and taken off `pending`, so it is
never retried; its files read as EIO there until fsck --repair quarantines it.

A full disk: a batch that cannot be stored is kept (its verified LM containers, so the model does
not run again for them) and the background loop waits before it tries again — RETRY_FIRST seconds,
doubling up to RETRY_MAX, logging once per wait — and resumes at once when the store's disk has
room again (checked every few seconds), instead of re-encoding the same batch in a tight loop.

Recoding (`compact(..., recode=True)`, `llmfs compact --recode`): the candidates are LM blocks
coded by a model other than the current one (an older engine version, another model, a fingerprint
of an older release: `recode_candidates`), or continuing another dictionary than the current
model's (codec/lm/dictionary.py: after `llmfs tune` chose a new one, or older payloads without). Each is decoded with the model that made it, encoded
again with zstd and the current model (the smallest container wins, as always — it need not beat
the old one: the point is to stop needing the old model), verified and swapped in like any other
batch. Afterwards the store's model files that no block needs are dropped (`Models.retire_unused`),
which is how an old engine version or model is retired deliberately.

Threading: the daemon runs one background thread (`run_in_background`) at the lowest CPU priority;
`compact()` may also be called by a control request or `llmfs compact` on an unmounted store. One
lock makes compactions take turns. `stop()` makes the loop exit between batches and aborts a batch
before its write transaction.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmfs.codec import ContainerError, Registry
from llmfs.codec.registry import LM, RAW, ZSTD, peek_header

from .store import FULL_DISK_SLACK, Store, StoreError, StoreFull, now_ns

log = logging.getLogger("llmfs")

# Ten minutes: a file being written, rewritten or deleted soon after (build outputs, editors'
# swap files, git's temporary objects) is not worth minutes of model time.
COMPACT_AFTER = 600.0
# Plaintext bytes per batch: 16 blocks of 64 KiB go through the engine together.
BATCH_BYTES = 1 << 20
# How often the background thread looks for cold blocks when it found none.
IDLE_SECONDS = 30.0
# A full disk: the first wait before a batch is tried again, and the longest (the wait doubles).
RETRY_FIRST = 10.0
RETRY_MAX = 600.0
# While waiting, how often the disk is looked at: compaction resumes once it has room again.
ROOM_POLL = 5.0
# Verified LM containers kept for a batch that could not be stored (full disk): at most this many.
READY_KEPT = 256


def _blocks_of(t, inos) -> set[bytes] | None:
    """The hashes of every block of inodes `inos` (None: no restriction, all blocks)."""
    if inos is None:
        return None
    wanted = set()
    for ino in inos:
        wanted.update(t.block_hashes(ino, 0, (1 << 64) - 1).values())
    return wanted


def lower_priority() -> None:
    """Run the calling thread at the lowest CPU priority (Linux applies it to that thread alone;
    with one torch thread the model's work runs on it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass


@dataclass
class Result:
    blocks: int = 0  # blocks looked at
    plain: int = 0  # their plaintext bytes
    before: int = 0  # their container bytes before
    after: int = 0  # ... and after
    lm_blocks: int = 0  # blocks now stored by the LM
    skipped: int = 0  # blocks the LM could not help (left as they were)
    changed: int = 0  # blocks rewritten or deleted while being compacted (left alone)
    damaged: int = 0  # blocks that could not be read (reported, taken off pending)
    seconds: float = 0.0

    def add(self, other: Result) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def saved(self) -> int:
        return self.before - self.after


class Compactor:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        lm_codec: Callable[[], object],
        model_spec: str,
        compact_after: float = COMPACT_AFTER,
        batch_bytes: int = BATCH_BYTES,
    ):
        """`lm_codec()` returns the store's LM codec (loaded on first use: seconds)."""
        self.store = store
        self.registry = registry
        self._lm_codec = lm_codec
        self.model_spec = model_spec
        self.compact_after = compact_after
        self.batch_bytes = batch_bytes
        self._turn = threading.Lock()
        self._stop = threading.Event()
        self.shutdown_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.totals = Result()
        # A coder with encode_many(datas, fingerprint) -> [(container, verified) | None] that
        # does the model's work elsewhere (llmfs/cluster.py); None: all of it here.
        self.remote = None
        # h -> (old container, verified LM container or None: not smaller) of a batch that could
        # not be stored
        self._ready: dict[bytes, tuple[bytes, bytes | None]] = {}
        self.retry_first, self.retry_max, self.room_poll = RETRY_FIRST, RETRY_MAX, ROOM_POLL

    # -- choosing blocks -------------------------------------------------------------------------
    def candidates(self, older_than: float | None = None, inos=None) -> list[bytes]:
        """Pending blocks older than `older_than` seconds (default compact_after; 0 = all), oldest
        first; only those of inodes `inos` when given."""
        age = self.compact_after if older_than is None else older_than
        cutoff = now_ns() - int(age * 1e9)
        with self.store.read() as t:
            pending = sorted((ts, h) for h, ts in t.pending() if ts <= cutoff)
            wanted = _blocks_of(t, inos)
            if wanted is not None:
                pending = [(ts, h) for ts, h in pending if h in wanted]
        return [h for _, h in pending]

    @staticmethod
    def _is_current(blob, head, codec, keep) -> bool:
        """Whether LM block `blob` (header `head`) is coded as `codec` codes now: one of its
        fingerprints `keep` and, where the codec continues a dictionary, that dictionary (one of
        its classes' dictionaries, where it has several)."""
        if head.fingerprint not in keep:
            return False
        classes = getattr(codec, "classes", None)
        if classes is not None:  # several: any of them (a block without one is recoded: the
            # compactor does not tokenize to learn whether none is this block's pick)
            from llmfs.codec.lm.codec import payload_dictionary

            did = payload_dictionary(bytes(blob[head.payload_offset : head.payload_offset + 16]))
            return did is not None and did in {d.id for d in classes.dictionaries if d is not None}
        d = getattr(codec, "dictionary", None)
        if d is None:
            return True
        from llmfs.codec.lm.codec import payload_dictionary

        return payload_dictionary(bytes(blob[head.payload_offset : head.payload_offset + 16])) == d.id

    def recode_candidates(self, inos=None) -> list[bytes]:
        """LM blocks not coded as the current compaction codec codes (another model, another
        dictionary: _is_current), of inodes `inos` if given."""
        current = self._lm_codec()
        keep = getattr(current, "fingerprints", {current.fingerprint})
        with self.store.read(buffers=True) as t:
            wanted = _blocks_of(t, inos)
            out = []
            for h, head, _size in t.block_headers():  # head None: damaged (fsck reports it)
                if (
                    head is not None
                    and head.codec_id == LM
                    and (wanted is None or h in wanted)
                    and not self._is_current(t.container_view(h), head, current, keep)
                ):
                    out.append(h)
        return out

    def recode(self, inos=None, progress: Callable[[int, int], None] | None = None) -> Result:
        """`llmfs compact --recode`: LM blocks not coded as the current codec codes are encoded
        again (recode_candidates, compact), then every LM block kept in a longer form than the
        store keeps one now is rewritten short (shorten)."""
        res = self.compact(self.recode_candidates(inos), progress, recode=True)
        if not self._stop.is_set():
            res.add(self.shorten(inos))
        return res

    def shorten(self, inos=None, batch: int = 256) -> Result:
        """Rewrite, without the model, the LM blocks (of inodes `inos` if given) that an older
        store format keeps longer than this one would (Txn.kept_longer: a full container from
        before format 3, a dictionary's 8-byte id from before format 4): the same container to
        every reader, fewer bytes at rest. In write transactions of `batch` blocks; a block
        rewritten or deleted meanwhile is left alone (restore_shorter looks again)."""
        res = Result()
        t0 = time.perf_counter()
        with self.store.read(buffers=True) as t:
            wanted = _blocks_of(t, inos)
            todo = [
                h
                for h, raw in t.blocks_at_rest()
                if (wanted is None or h in wanted) and t.kept_longer(h, raw)
            ]
        with self._turn:
            for i in range(0, len(todo), batch):
                with self.shutdown_lock:  # the daemon closes the store only under this lock
                    if self._stop.is_set():
                        break
                    with self.store.write() as t:
                        for h in todo[i : i + batch]:
                            before = t.stored_size(h)
                            saved = t.restore_shorter(h)
                            if saved:
                                res.blocks += 1
                                res.lm_blocks += 1
                                res.before += before
                                res.after += before - saved
        res.seconds = time.perf_counter() - t0
        return res

    # -- compacting ------------------------------------------------------------------------------
    def compact(
        self, hashes: list[bytes], progress: Callable[[int, int], None] | None = None, recode: bool = False
    ) -> Result:
        """Compact these blocks in batches; progress(done_plain_bytes, total_plain_bytes).
        recode: re-encode LM blocks of other models with the current one (see above). StoreFull
        (a full disk) stops it; what was done before stays done."""
        total = Result()
        lower_priority()  # a control request's thread, or the CLI's, as the loop's own
        with self._turn:
            with self.store.read(buffers=True) as t:  # headers only: no copies of whole blocks
                sizes = {h: t.plain_length(h) for h in hashes}
            with self.store.read() as t:
                damaged = [h for h, n in sizes.items() if n is None and t.refcount(h)]
            if damaged:
                total.damaged += self._drop_damaged(damaged, "its header is damaged")
            sizes = {h: n for h, n in sizes.items() if n is not None}
            todo = [h for h in hashes if h in sizes]
            grand = sum(sizes.values())
            done = 0
            while todo and not self._stop.is_set():
                batch, n = [], 0
                while todo and (not batch or n + sizes[todo[0]] <= self.batch_bytes):
                    h = todo.pop(0)
                    batch.append(h)
                    n += sizes[h]
                total.add(self._compact_batch(batch, recode))
                done += n
                if progress:
                    progress(done, grand)
        self.totals.add(total)
        return total

    def _compact_batch(self, hashes: list[bytes], recode: bool = False) -> Result:
        res = Result()
        t0 = time.perf_counter()
        with self.store.read() as t:
            old = {h: t.container(h) for h in hashes}
        old = {h: blob for h, blob in old.items() if blob is not None}
        plain, new, reused = {}, {}, set()
        damaged: dict[bytes, ContainerError] = {}  # unreadable blocks and why
        codec = self._lm_codec()
        self.registry.add_model(codec)
        fingerprint = codec.fingerprint
        keep = getattr(codec, "fingerprints", {fingerprint})
        to_decode = []
        for h, blob in old.items():
            try:
                head = peek_header(blob)
            except ContainerError as e:
                damaged[h] = e
                continue
            if head.codec_id == LM and (not recode or self._is_current(blob, head, codec, keep)):
                continue  # already done (a batch that raced with another compaction)
            to_decode.append(h)
        bound = self.store.block_size
        try:  # one batch: old LM blocks (recoding) decode side by side
            plain = dict(zip(to_decode, self.registry.decode_many([old[h] for h in to_decode], bound)))
        except ContainerError:
            for h in to_decode:
                try:
                    plain[h] = self.registry.decode_many([old[h]], bound)[0]
                except ContainerError as e:
                    damaged[h] = e
        for h, e in damaged.items():
            log.error(
                "compaction: block %s is unreadable (%s); skipped for good, run "
                "`llmfs fsck` to name its files",
                h.hex()[:16],
                e,
            )
        if damaged:
            res.damaged += self._drop_damaged(list(damaged), None, old)
        if not plain:
            return res
        todo = {}
        for h, data in plain.items():
            if peek_header(old[h]).codec_id == RAW:
                res.skipped += 1  # zstd could not shrink it: the LM will not either
                continue
            kept = self._ready.pop(h, None)
            if kept is not None and kept[0] == old[h]:  # coded before the disk filled: the
                if kept[1] is None:  # model does not run again
                    res.skipped += 1
                else:
                    new[h] = kept[1]
                    reused.add(h)
                continue
            todo[h] = data
        remote = self._remote_encode(todo, fingerprint)
        for h, data in todo.items():
            if self._stop.is_set():
                return res
            blob = remote[h][0] if remote.get(h) else self.registry.encode(data, (ZSTD, LM), fingerprint)
            was = peek_header(old[h]).codec_id
            if was == LM or (peek_header(blob).codec_id == LM and len(blob) < len(old[h])):
                new[h] = blob  # recoding keeps the best new container, whatever its size
            else:
                res.skipped += 1
        if self._stop.is_set():
            return res
        # verify: decode what we are about to keep, as one batch (not what was verified before
        # the disk filled, nor what another cluster worker has decoded already)
        keys = [h for h in new if h not in reused and not (remote.get(h) and remote[h][1])]
        if keys:
            try:
                decoded = self.registry.decode_many([new[h] for h in keys])
            except ContainerError as e:
                log.error("compaction: an LM container failed verification (%s); keeping the old ones", e)
                decoded = [None] * len(keys)
            for h, data in zip(keys, decoded):
                if data != plain[h]:
                    log.error("compaction: block %s did not round-trip; kept as it was", h.hex()[:16])
                    del new[h]
        try:
            with self.shutdown_lock:  # the daemon closes the store only under this lock
                if self._stop.is_set():
                    return res
                self._swap(old, new, plain, fingerprint, res)
        except StoreFull:
            if len(self._ready) + len(plain) <= READY_KEPT:  # verified, or not worth it (None)
                self._ready.update(
                    (h, (old[h], new.get(h))) for h in plain if peek_header(old[h]).codec_id != RAW
                )
            raise
        except StoreError as e:
            log.error("compaction: could not store the batch: %s", e)
            return Result()
        res.seconds = time.perf_counter() - t0
        return res

    def _remote_encode(self, todo: dict[bytes, bytes], fingerprint: bytes) -> dict:
        """hash -> (container, verified) from the remote coder (llmfs/cluster.py) when one is set;
        blocks missing here are encoded locally."""
        if self.remote is None or not todo:
            return {}
        keys = list(todo)
        try:
            got = self.remote.encode_many([todo[h] for h in keys], fingerprint)
        except Exception:  # the cluster is an accelerator: never a reason to stop compacting
            log.exception("compaction: the cluster failed; encoding this batch locally")
            return {}
        return {h: r for h, r in zip(keys, got) if r is not None}

    def _swap(self, old, new, plain, fingerprint, res: Result) -> None:
        """One write transaction: swap in verified containers of blocks still stored unchanged."""
        with self.store.write() as t:
            for h in old:
                current = t.container(h)
                if current is None or current != old[h]:
                    res.changed += 1
                    continue
                res.blocks += 1
                res.before += t.stored_size(h)  # at rest, as the counters count it
                if h in new:
                    t.replace_container(h, new[h])
                    res.lm_blocks += peek_header(new[h]).codec_id == LM
                    res.after += t.stored_size(h)  # as kept: an LM container compact
                    res.plain += len(plain[h])
                else:
                    res.after += t.stored_size(h)
                t.remove_pending(h)
            if any(peek_header(b).codec_id == LM for b in new.values()):
                t.add_model(fingerprint, self.model_spec)

    def _drop_damaged(self, hashes: list[bytes], why: str | None, old=None) -> int:
        """Take damaged blocks off the compaction queue (still the same container, if `old`)."""
        if why:
            for h in hashes:
                log.error(
                    "compaction: block %s is unreadable (%s); skipped for good, run "
                    "`llmfs fsck` to name its files",
                    h.hex()[:16],
                    why,
                )
        try:
            with self.shutdown_lock, self.store.write() as t:
                for h in hashes:
                    if old is None or t.container(h) == old[h]:
                        t.remove_pending(h)
        except StoreError as e:  # it stays queued; the next pass reports it again
            log.warning("compaction: could not take damaged blocks off the queue: %s", e)
        return len(hashes)

    # -- the background loop ---------------------------------------------------------------------
    def run_in_background(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llmfs-compactor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        lower_priority()
        delay = 0.0  # the wait after a full disk; 0 while batches are stored
        while not self._stop.is_set():
            try:
                hashes = self.candidates()
                if hashes:
                    res = self.compact(hashes[:64])
                    delay = 0.0
                    if res.blocks:
                        log.info(
                            "compacted %d blocks: %d -> %d bytes (%d by the LM)",
                            res.blocks,
                            res.before,
                            res.after,
                            res.lm_blocks,
                        )
                    if res.blocks or res.damaged:
                        continue  # progress: the next batch at once
            except StoreFull as e:
                try:
                    free = self.store.disk_free()
                except OSError:
                    free = 0
                delay = min(self.retry_max, max(self.retry_first, 2 * delay))
                log.warning(
                    "compaction: the disk is full (%s); trying again in %.1f s or when it has room", e, delay
                )
                self._wait_for_room(delay, free)
                continue
            except Exception:  # the daemon must keep serving files whatever happens here
                if self._stop.is_set():
                    return  # the store closed under a batch that was being dropped anyway
                log.exception("compaction failed; retrying later")
            self._stop.wait(IDLE_SECONDS)

    def _wait_for_room(self, delay: float, free: int) -> None:
        """Wait `delay` seconds, or less once the store's disk has room again — a few batches
        more than the `free` bytes it had when it was full — or stop is asked."""
        room = min(2 * FULL_DISK_SLACK, free + 4 * self.batch_bytes)
        end = time.monotonic() + delay
        while not self._stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, self.room_poll))
            try:
                if self.store.disk_free() >= room:
                    return
            except OSError:
                return

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to stop; wait briefly. A model call in flight finishes on its own and its
        batch is dropped before any write."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
