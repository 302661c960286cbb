"""Compaction on a Ray cluster: the daemon's compactor hands batches of block plaintexts to Ray
actors that hold the store's model on their node (a GPU when the node has one, else the CPU) and
gets verified containers back. Optional: `pip install .[cluster]`; without `[cluster]` in the
config (or `--cluster ADDRESS`) nothing here is imported.

Why offloading is safe: the engine is exact, so a container encoded on any node decodes
bit-identically on any other. Still, nothing is trusted:
  * each actor loads the model by the same spec resolution the daemon uses (codec.lm.open_codec;
    never a hub) and reports the codec's fingerprint; an actor whose fingerprint is not the store's
    is never given work;
  * a container comes back only after an actor *other than the one that encoded it* decoded it and
    the bytes equalled the plaintext (with a single actor the compactor verifies it locally, as it
    does its own work); the daemon then checks the header itself (length, checksum of the
    plaintext, fingerprint) before the compactor swaps it in — the fast-tier container stays until
    then;
  * an actor that dies or takes longer than `timeout` costs a retry on another actor (Ray restarts
    the dead one); a block no actor could do is encoded locally.

Cold reads: the decode cache's misses (a reader's, or a prefetch batch) may be decoded on the
cluster too (decode_many; namespace.Filesystem asks it through its `remote` decoder and checks
every block against its stored checksum itself). At each connect the daemon decodes one sample
container there (a round trip through the driver, as a read makes it) and here; a read goes to
the cluster only when its workers, one block each, are expected to beat the local decode, and only
to workers idle now (a read never queues behind a compaction batch). Any failure, a timeout (twice
the expected time) or a lost cluster means a local decode.

Process layout: the Ray driver does not run in the FUSE daemon but in a child process (`_driver`).
A Ray driver exits its process when it loses its raylet or the GCS; in a child that only closes a
pipe, which fails every request in flight at once: the compactor falls back to local encoding
(and tries the cluster again after RECONNECT_SECONDS), reads decode locally — reads and writes
never wait on a cluster that went away. The child also keeps Ray's threads, signal handlers and
memory out of the daemon.

Threading: requests carry ids; a receiver thread hands each reply to its caller, so a read's
decode and a compaction batch are in flight together (the driver serves them in a thread each).
The compactor sends one batch at a time; reconnecting (minutes) happens only on the compactor's
thread or in the background, never on a reader's.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from llmfs.codec import container
from llmfs.codec.registry import LM, peek_header

log = logging.getLogger("llmfs")

# A batch (1 MiB of plaintext by default) that has not come back in this long is given up: its
# actor is restarted and the blocks are retried elsewhere, or encoded locally.
TIMEOUT = 600.0
# How often a lost cluster is tried again.
RECONNECT_SECONDS = 60.0
# Attempts of one chunk (an encode or a verifying decode) before its blocks go back to the daemon.
ATTEMPTS = 3
# Connecting, placing the actors and loading the model on every node.
START_TIMEOUT = 300.0
# Added to twice a read's expected decode time on the cluster before it is decoded locally instead.
DECODE_SLACK = 5.0
# What the start-up measurement decodes on the cluster and here (plain English prose, which the
# LM codes as it codes most stored text): small, because the daemon decodes it too.
SAMPLE = (
    b"The exact engine is what makes offloading safe: a container encoded on any node decodes "
    b"bit-identically on any other. Each block is checked against the checksum stored with it, so "
    b"a worker that returns the wrong bytes costs only a local decode, never a wrong read. Cold "
    b"reads go to the cluster when its workers together decode faster than this machine alone.\n"
)


class ClusterUnavailable(Exception):
    """The cluster cannot take work now (not connected, no worker with the store's model)."""


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class WorkerStats:
    name: str
    host: str = ""
    node: str = ""
    device: str = ""
    pid: int = 0
    alive: bool = True
    blocks: int = 0  # blocks this worker encoded
    plain: int = 0  # their plaintext bytes
    verified: int = 0  # blocks of other workers it decoded to check them
    seconds: float = 0.0  # time its encodes took (as seen by the driver)
    failures: int = 0  # calls that died, timed out or raised
    decoded: int = 0  # blocks it decoded for cold reads

    @property
    def rate(self) -> float:
        return self.plain / self.seconds if self.seconds else 0.0


@dataclass
class ClusterStats:
    address: str
    state: str = "connecting"  # connecting | ready | unavailable
    error: str = ""
    workers: list[WorkerStats] = field(default_factory=list)
    batches: int = 0
    blocks: int = 0  # blocks that came back verified (by another worker or locally)
    plain: int = 0
    seconds: float = 0.0  # wall time of the cluster batches
    mismatches: int = 0  # verifying decodes that did not reproduce the plaintext
    retries: int = 0
    local_fallbacks: int = 0  # blocks the daemon encoded itself because the cluster could not
    # cold reads: the start-up measurement (plaintext B/s of one worker through the driver, and of
    # the daemon), then the blocks decoded there and those the daemon decoded after asking
    decode_remote_rate: float = 0.0
    decode_local_rate: float = 0.0
    decode_blocks: int = 0
    decode_plain: int = 0
    decode_seconds: float = 0.0
    decode_fallbacks: int = 0  # blocks asked for that the daemon decoded itself in the end
    decode_failures: int = 0  # decode calls that died, timed out or raised

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rate"] = self.plain / self.seconds if self.seconds else 0.0
        d["decode_rate"] = self.decode_plain / self.decode_seconds if self.decode_seconds else 0.0
        for w, ws in zip(d["workers"], self.workers):
            w["rate"] = ws.rate
        return d


# -- the daemon's side -------------------------------------------------------------------------


class ClusterCoder:
    """The compactor's remote coder and the reads' remote decoder. encode_many() returns, per
    plaintext, (container, verified) or None where the cluster could not do it (the compactor then
    encodes that block locally); decode_many() returns plaintexts of LM containers, or None when
    the cluster should not or could not (the reader then decodes locally)."""

    def __init__(
        self,
        address: str,
        model: str | Callable,
        workers: int = 0,
        timeout: float = TIMEOUT,
        device: str = "auto",
        threads: int = 1,
        reconnect: float = RECONNECT_SECONDS,
        local_decode: Callable[[list[bytes]], list[bytes]] | None = None,
    ):
        """model: a spec for codec.lm.open_codec (the store's), or for tests a picklable callable
        that returns a codec. workers: 0 = one per GPU of the cluster, one per CPU-only node.
        threads: the engine's threads in each CPU actor — 1, because a node runs one actor per
        CPU slot (`num_cpus=1`) and actors sharing a node's cores must not each spread over all
        of them (on a 2-core machine two actors of 2 threads each would thrash). local_decode:
        the daemon's own decode (Registry.decode_many), for the start-up measurement that decides
        whether cold reads are decoded on the cluster; None = reads never use the cluster."""
        self.address, self.model = address, model
        self.workers, self.timeout = workers, timeout
        self.device, self.threads, self.reconnect = device, threads, reconnect
        self.local_decode = local_decode
        # _life: held while (re)connecting, which takes seconds to minutes — only the compactor
        # and start() ever wait for it; _mutex: the connection and the requests in flight, held
        # for microseconds; _encoding: one compaction batch at a time.
        self._life = threading.Lock()
        self._mutex = threading.Lock()
        self._encoding = threading.Lock()
        self._reading = threading.Lock()  # one read's decode on the cluster at a time
        self._proc = None
        self._conn = None
        self._pending: dict[int, queue.SimpleQueue] = {}
        self._next_id = 0
        self._down_since: float | None = None
        self._reads_local_until = 0.0  # after a read's decode failed there: reads stay local
        self._stats = ClusterStats(address)
        self._progress: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the driver process, wait until its workers hold the model (or it failed), then
        measure cold-read decoding there against here. Never raises: a cluster that cannot be
        reached is reported and tried again later."""
        with self._life:
            self._start_locked()

    def _start_locked(self) -> None:
        self._close_locked()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_driver,
            name="llmfs-cluster",
            daemon=True,
            args=(child, self.address, self.model, self.workers, self.device, self.threads, self.timeout),
        )
        proc.start()
        child.close()
        self._stats.state = "connecting"
        try:
            if not parent.poll(START_TIMEOUT):
                raise ClusterUnavailable(f"no answer from the cluster driver in {START_TIMEOUT:.0f} s")
            reply = parent.recv()
        except (ClusterUnavailable, EOFError, OSError) as e:
            parent.close()
            proc.kill()
            self._fail(str(e) or "the cluster driver exited")
            return
        if "error" in reply:
            parent.close()
            proc.join(10)
            self._fail(reply["error"])
            return
        with self._mutex:
            self._proc, self._conn = proc, parent
            self._stats.workers = [WorkerStats(**w) for w in reply["workers"]]
            self._stats.state, self._stats.error, self._down_since = "ready", "", None
        threading.Thread(
            target=self._receive_loop, args=(parent,), name="llmfs-cluster-rx", daemon=True
        ).start()
        log.info(
            "cluster %s: %d worker(s): %s",
            self.address,
            len(self._stats.workers),
            ", ".join(f"{w.name} on {w.host} ({w.device})" for w in self._stats.workers),
        )
        self.calibrate()

    def _fail(self, why: str, conn=None) -> None:
        """The cluster is lost (or never came): compaction goes local, reads decode locally, and
        the compactor tries again after `reconnect` seconds. conn: only if it is still that one."""
        with self._mutex:
            if conn is not None and conn is not self._conn:
                return
            if self._stats.state != "unavailable" or self._stats.error != why:
                log.warning(
                    "cluster %s is not available (%s); compacting and decoding locally, trying "
                    "again in %.0f s",
                    self.address,
                    why,
                    self.reconnect,
                )
            self._stats.state, self._stats.error = "unavailable", why
            self._down_since = time.monotonic()
            for w in self._stats.workers:
                w.alive = False
            conn, proc = self._conn, self._proc
            self._conn = self._proc = None
            pending, self._pending = self._pending, {}
        for q in pending.values():  # every caller waiting on the lost driver falls back now
            q.put({"error": why})
        if conn is not None:
            conn.close()
        if proc is not None:
            threading.Thread(target=_reap, args=(proc,), daemon=True).start()

    def close(self) -> None:
        """Stop the driver (its actors go with it). Waits for nothing in flight: callers waiting
        on it get "unavailable" and do their work locally."""
        with self._mutex:
            conn, proc = self._conn, self._proc
            self._conn = self._proc = None
            pending, self._pending = self._pending, {}
            self._stats.state = "closed"
        for q in pending.values():
            q.put({"error": "closed"})
        _stop_driver(conn, proc)

    def _close_locked(self) -> None:
        with self._mutex:
            conn, proc = self._conn, self._proc
            self._conn = self._proc = None
        _stop_driver(conn, proc)

    def _receive_loop(self, conn) -> None:
        """Hand every message of the driver to the request it answers; a closed pipe (the driver
        exited: the head went away, or close()) fails them all at once."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError, TypeError):
                # TypeError: close() closed the pipe under recv()
                self._fail("the cluster driver exited", conn)
                return
            with self._mutex:
                q = self._pending.get(msg.get("id"))
            if q is not None:  # else a reply nobody waits for any more (a read that timed out)
                q.put(msg)

    def _request(self, msg: dict) -> tuple[int, queue.SimpleQueue] | None:
        with self._mutex:
            conn = self._conn
            if conn is None:
                return None
            self._next_id += 1
            rid, q = self._next_id, queue.SimpleQueue()
            self._pending[rid] = q
            try:
                conn.send(dict(msg, id=rid))
            except (OSError, ValueError):
                self._pending.pop(rid, None)
                return None
        return rid, q

    def _done(self, rid: int) -> None:
        with self._mutex:
            self._pending.pop(rid, None)

    def _ready(self) -> bool:
        """Connected; else reconnect (the compactor's thread only: it may wait minutes) once
        `reconnect` seconds have passed since the cluster was lost."""
        if self._conn is not None:
            return True
        if self._down_since is not None and time.monotonic() - self._down_since < self.reconnect:
            return False
        with self._life:
            if self._conn is None:
                self._start_locked()
        return self._conn is not None

    # -- compaction ------------------------------------------------------------------------------
    def encode_many(
        self,
        datas: list[bytes],
        fingerprint: bytes,
    ) -> list[tuple[bytes, bool] | None]:
        """Containers of `datas` made by the cluster with the model `fingerprint`: (container,
        True) verified by another worker, (container, False) to be verified by the caller, None
        where the cluster could not (the caller encodes it itself)."""
        with self._encoding:
            st = self._stats
            sent = (
                self._request({"op": "encode", "datas": datas, "fingerprint": fingerprint})
                if (datas and self._ready())
                else None
            )
            if sent is None:
                st.local_fallbacks += len(datas)
                return [None] * len(datas)
            rid, q = sent
            t0 = time.perf_counter()
            base = {w.name: w.plain for w in st.workers}
            try:
                while True:
                    try:
                        reply = q.get(timeout=self.timeout * ATTEMPTS + 60)
                    except queue.Empty:
                        reply = {"error": "no answer from the cluster driver"}
                    if "progress" in reply:
                        self._progress = {k: base.get(k, 0) + v for k, v in reply["progress"].items()}
                        continue
                    break
            finally:
                self._done(rid)
                self._progress = {}
            if "error" in reply:
                self._fail(reply["error"])
                st.local_fallbacks += len(datas)
                return [None] * len(datas)
            out = self._check(datas, fingerprint, reply)
            st.batches += 1
            st.seconds += time.perf_counter() - t0
            if all(r is None for r in out) and reply["retries"]:
                # every worker failed every try: the cluster is gone or going; stop asking it
                # (and paying a timeout per batch) until RECONNECT_SECONDS have passed
                self._fail("no worker could take the batch")
            return out

    def _check(self, datas, fingerprint, reply) -> list[tuple[bytes, bool] | None]:
        """Merge the driver's answer into the stats and check every header here: the daemon swaps
        in nothing whose length, checksum or model is not what it asked for."""
        st = self._stats
        self._merge_workers(reply["workers"])
        st.mismatches += reply["mismatches"]
        st.retries += reply["retries"]
        out: list[tuple[bytes, bool] | None] = []
        for data, item in zip(datas, reply["results"]):
            if item is None:
                st.local_fallbacks += 1
                out.append(None)
                continue
            blob, verified = item
            try:
                head = peek_header(blob[: container.MAX_HEADER_SIZE])
                ok = (
                    head.length == len(data)
                    and head.checksum == container.checksum(data)
                    and (head.codec_id != LM or head.fingerprint == fingerprint)
                )
            except container.ContainerError:
                ok = False
            if not ok:
                log.error(
                    "cluster: a worker returned a container that does not describe its "
                    "block; encoding it locally"
                )
                st.local_fallbacks += 1
                out.append(None)
                continue
            if verified:
                st.blocks += 1
                st.plain += len(data)
            out.append((blob, verified))
        return out

    def _merge_workers(self, workers: list[dict]) -> None:
        self._stats.workers = [WorkerStats(**w) for w in workers]

    # -- cold reads ------------------------------------------------------------------------------
    def calibrate(self) -> None:
        """Decode one sample LM container on the cluster (a round trip through the driver, as a
        read makes it) and here, and keep both rates: decode_many() asks the cluster only when
        its estimate beats local decoding. Reads are never sent before this has run."""
        st = self._stats
        st.decode_local_rate = st.decode_remote_rate = 0.0
        if self.local_decode is None:
            return
        sent = self._request({"op": "sample", "data": SAMPLE})
        if sent is None:
            return
        rid, q = sent
        try:
            reply = q.get(timeout=self.timeout)
        except queue.Empty:
            reply = {"error": "timed out"}
        finally:
            self._done(rid)
        blob = reply.get("blob")
        if blob is None or peek_header(blob).codec_id != LM:
            log.warning("cluster: no sample to measure decoding with (%s); reads decode locally", reply)
            return
        t0 = time.perf_counter()
        got = self._decode_remote([blob], self.timeout)
        remote = time.perf_counter() - t0
        if got is None or got[0] != SAMPLE:
            log.warning("cluster: the sample did not decode on the cluster; reads decode locally")
            return
        t0 = time.perf_counter()
        try:
            ok = self.local_decode([blob]) == [SAMPLE]
        except Exception as e:  # noqa: BLE001 - the local model is the reads' business, not ours
            log.warning("cluster: the sample did not decode here (%s); reads decode locally", e)
            return
        local = time.perf_counter() - t0
        if not ok:
            return
        st.decode_local_rate = len(SAMPLE) / local
        st.decode_remote_rate = len(SAMPLE) / remote
        log.info(
            "cluster %s: decoding %.0f B/s per worker there (round trip), %.0f B/s here: cold reads of %s",
            self.address,
            st.decode_remote_rate,
            st.decode_local_rate,
            "several blocks go to the cluster"
            if st.decode_remote_rate * len(st.workers) > st.decode_local_rate
            else "one block or more go to the cluster"
            if st.decode_remote_rate > st.decode_local_rate
            else "any size stay local",
        )

    def worth_it(self, blocks: int) -> bool:
        """Whether decoding `blocks` LM blocks on the cluster is expected to beat decoding them
        here: the cluster splits them over its workers (at most one block each), each at the
        measured round-trip rate, against the measured local rate."""
        st = self._stats
        if self._conn is None or not st.decode_remote_rate or blocks < 1:
            return False
        if time.monotonic() < self._reads_local_until:
            return False
        return st.decode_remote_rate * min(blocks, len(st.workers)) > st.decode_local_rate

    def decode_many(self, blobs: list[bytes]) -> list[bytes | None] | None:
        """Plaintexts of LM containers decoded on the cluster (each checked there against its
        stored checksum, and to be checked again by the caller), None per block the cluster could
        not do; None when it should not be asked (not connected, slower than here by the
        start-up measurement, another read on the cluster now, every worker busy compacting, a
        read failed there in the last `reconnect` seconds). Never waits long on a lost cluster: the driver's exit fails the call
        at once, a call is given up after twice its expected time plus DECODE_SLACK (the caller
        then decodes locally), and after a failure reads stay local for a while."""
        st = self._stats
        if not self.worth_it(len(blobs)):
            if self._conn is None:
                self._reconnect_later()
            return None
        # A second read while one is on the cluster decodes here: it would only queue behind the
        # first in the driver (its idle workers are taken) and miss its own time.
        if not self._reading.acquire(blocking=False):
            return None
        try:
            size = sum(peek_header(b).length for b in blobs)
            expected = size / (st.decode_remote_rate * min(len(blobs), len(st.workers)))
            t0 = time.perf_counter()
            failures = st.decode_failures
            got = self._decode_remote(blobs, 2 * expected + DECODE_SLACK)
        finally:
            self._reading.release()
        if st.decode_failures > failures:
            # a worker died or missed its time: the cluster may be going away (a lost head is
            # noticed by the driver only later), so reads stop paying for it for a while
            self._reads_local_until = time.monotonic() + self.reconnect
            log.warning(
                "cluster: a read's decode failed there; cold reads decode here for %.0f s", self.reconnect
            )
        if got is None:
            st.decode_fallbacks += len(blobs)
            return None
        ok = [d for d in got if d is not None]
        st.decode_blocks += len(ok)
        st.decode_plain += sum(len(d) for d in ok)
        st.decode_seconds += time.perf_counter() - t0
        st.decode_fallbacks += len(got) - len(ok)
        return got

    def _decode_remote(self, blobs: list[bytes], timeout: float) -> list[bytes | None] | None:
        sent = self._request({"op": "decode", "blobs": blobs, "timeout": timeout})
        if sent is None:
            return None
        rid, q = sent
        try:
            reply = q.get(timeout=timeout + 5.0)
        except queue.Empty:
            self._stats.decode_failures += 1
            log.warning("cluster: a read's decode took over %.0f s; decoding it locally", timeout)
            return None
        finally:
            self._done(rid)
        if reply.get("busy"):
            return None
        if "error" in reply:
            self._stats.decode_failures += 1
            return None
        if "workers" in reply:
            self._merge_workers(reply["workers"])
        self._stats.decode_failures += reply.get("failures", 0)
        return reply["results"]

    def _reconnect_later(self) -> None:
        """A read found the cluster lost: reconnect in the background once it is due (a read
        never waits for it)."""
        if self._down_since is None or time.monotonic() - self._down_since < self.reconnect:
            return
        if self._life.acquire(blocking=False):
            self._down_since = time.monotonic()  # one attempt per period
            self._life.release()
            threading.Thread(target=self.start, name="llmfs-cluster", daemon=True).start()

    # -- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        return self._stats.as_dict()

    def progress(self) -> dict[str, int]:
        """Plaintext bytes each worker has encoded since the mount, the batch in flight included."""
        done = {w.name: w.plain for w in self._stats.workers}
        done.update(self._progress)
        return done


def _stop_driver(conn, proc) -> None:
    """Tell the driver process to stop (if its pipe is still open) and wait for it to exit."""
    if conn is not None:
        try:
            conn.send({"op": "stop"})
        except OSError:
            pass
        conn.close()
    if proc is not None:
        _reap(proc)


def _reap(proc) -> None:
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


# -- the driver process ----------------------------------------------------------------------


def _load_codec(model, device: str, threads: int):
    if callable(model):
        return model()
    from llmfs.codec.lm import open_codec

    from .models import DECODE_BATCH

    return open_codec(model, batch=DECODE_BATCH, threads=threads, device=device)


class _Worker:
    """A Ray actor: the model on one node. Plain methods; `_driver` wraps the class with
    ray.remote (ray is imported only there)."""

    def __init__(self, name: str, model, device: str, threads: int):
        import socket

        from llmfs.codec import Registry

        try:  # encode on GPU nodes, or at low priority beside a node's other work
            os.nice(10)
        except OSError:
            pass
        self.name = name
        self.codec = _load_codec(model, device, threads)
        self.registry = Registry()
        self.registry.add_model(self.codec)
        dev = str(getattr(self.codec.engine, "device", "cpu"))
        self._info = {
            "name": name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": dev,
            "fingerprint": self.codec.fingerprint,
        }

    def info(self) -> dict:
        import ray

        return dict(self._info, node=ray.get_runtime_context().get_node_id()[:12])

    def sample(self, data: bytes) -> bytes:
        """An LM container of `data` whatever its size (for the daemon's timing of decodes)."""
        fp = self.codec.fingerprint
        return container.pack(LM, len(data), container.checksum(data), self.codec.encode(data), fp)

    def encode(self, datas: list[bytes], fingerprint: bytes) -> list[bytes]:
        """The smallest container of each (LM, zstd or raw: the registry's choice)."""
        from llmfs.codec.registry import ZSTD

        if fingerprint != self.codec.fingerprint:
            raise ValueError(
                f"worker {self.name} holds model {self.codec.fingerprint.hex()}, "
                f"asked for {fingerprint.hex()}"
            )
        return [self.registry.encode(d, (ZSTD, LM), fingerprint) for d in datas]

    def decode(self, blobs: list[bytes]) -> list[bytes | None]:
        """Decoded plaintexts (checked against their stored checksums), None for any that fail."""
        from llmfs.codec import ContainerError

        try:
            return self.registry.decode_many(blobs)
        except ContainerError:
            out = []
            for b in blobs:
                try:
                    out.append(self.registry.decode(b))
                except ContainerError:
                    out.append(None)
            return out


def _driver(conn, address: str, model, workers: int, device: str, threads: int, timeout: float) -> None:
    """The child process: connect, start the actors, serve requests until told to stop or the
    pipe closes. Compaction batches and reads' decodes run in a thread each, so a read is never
    queued behind a batch in the driver (it may still wait for a worker: see _Pool.decode)."""
    try:
        os.nice(5)
    except OSError:
        pass
    try:
        pool = _Pool(address, model, workers, device, threads, timeout)
    except Exception as e:  # noqa: BLE001 - anything Ray raises is "not available" to the daemon
        try:
            conn.send({"error": f"{type(e).__name__}: {e}"})
        finally:
            conn.close()
        return
    conn.send({"workers": pool.worker_stats()})
    send_lock = threading.Lock()

    def send(msg: dict) -> None:
        with send_lock:
            try:
                conn.send(msg)
            except (OSError, ValueError):
                pass  # the daemon is gone or closing: the main loop ends on the closed pipe

    def serve(requests: queue.SimpleQueue) -> None:
        while True:
            req = requests.get()
            rid = req["id"]
            try:
                if req["op"] == "encode":
                    results = pool.encode_verified(
                        req["datas"], req["fingerprint"], lambda p, rid=rid: send({"id": rid, "progress": p})
                    )
                    reply = {
                        "results": results,
                        "workers": pool.worker_stats(),
                        "mismatches": pool.take("mismatches"),
                        "retries": pool.take("retries"),
                    }
                elif req["op"] == "decode":
                    reply = pool.decode(req["blobs"], req["timeout"])
                else:  # "sample"
                    reply = {"blob": pool.sample(req["data"])}
            except Exception as e:  # noqa: BLE001
                reply = {"error": f"{type(e).__name__}: {e}"}
            send(dict(reply, id=rid))

    lanes = {"encode": queue.SimpleQueue(), "decode": queue.SimpleQueue()}
    for lane in lanes.values():
        threading.Thread(target=serve, args=(lane,), daemon=True).start()
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            break
        op = req.get("op")
        if op == "encode":
            lanes["encode"].put(req)
        elif op in ("decode", "sample"):
            lanes["decode"].put(req)
        else:
            break
    pool.shutdown()
    os._exit(0)  # not waiting for a lane blocked in Ray on a cluster that went away


class _Pool:
    """The driver's actors, the encode → verify pipeline across them, and reads' decodes on the
    idle ones. Two driver threads use it (compaction, reads): `busy` counts each actor's calls in
    flight under a lock."""

    def __init__(self, address, model, workers, device, threads, timeout):
        import ray

        self.ray = ray
        ray.init(
            address=address,
            namespace="llmfs",
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
        self.timeout = timeout
        self.counters = {"mismatches": 0, "retries": 0}
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if workers <= 0:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            workers = gpus + sum(1 for n in nodes if not n.get("Resources", {}).get("GPU"))
        use_gpu = gpus >= workers and device != "cpu"
        actor_cls = ray.remote(_Worker).options(
            num_cpus=1,
            num_gpus=1 if use_gpu else 0,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )
        self.actors = [
            actor_cls.remote(
                f"w{i}", model, "cuda" if use_gpu else ("cpu" if device == "cuda" else device), threads
            )
            for i in range(workers)
        ]
        infos = ray.get([a.info.remote() for a in self.actors], timeout=START_TIMEOUT)
        fingerprints = {info.pop("fingerprint") for info in infos}
        if len(fingerprints) != 1:
            raise RuntimeError(
                "the workers loaded different models: " + ", ".join(sorted(fp.hex() for fp in fingerprints))
            )
        self.fingerprint = fingerprints.pop()
        self.stats = [WorkerStats(**info) for info in infos]
        self._busy_lock = threading.Lock()
        self.busy = [0] * len(self.actors)

    def worker_stats(self) -> list[dict]:
        return [asdict(w) for w in self.stats]

    def take(self, key: str) -> int:
        n, self.counters[key] = self.counters[key], 0
        return n

    def _mark(self, w: int, delta: int) -> None:
        with self._busy_lock:
            self.busy[w] += delta

    def shutdown(self) -> None:
        try:
            for a in self.actors:
                self.ray.kill(a, no_restart=True)
            self.ray.shutdown()
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            pass

    # -- reads -------------------------------------------------------------------------------------
    def sample(self, data: bytes) -> bytes:
        """An LM container of `data` made by a worker (for the daemon's start-up measurement)."""
        self._mark(0, 1)
        try:
            return self.ray.get(self.actors[0].sample.remote(data), timeout=self.timeout)
        finally:
            self._mark(0, -1)

    def decode(self, blobs: list[bytes], timeout: float) -> dict:
        """Decode a read's LM containers on the workers that are idle now, split contiguously in
        about equal plaintext per worker; {"busy": True} when none is (every one is compacting:
        the daemon decodes locally rather than queue behind a batch). A worker that fails or
        misses `timeout` leaves its blocks None (the daemon decodes those)."""
        ray = self.ray
        with self._busy_lock:
            idle = [w for w, n in enumerate(self.busy) if n == 0][: len(blobs)]
            for w in idle:
                self.busy[w] += 1
        if not idle:
            return {"busy": True}
        try:
            sizes = [peek_header(b).length for b in blobs]
            total = sum(sizes) or 1
            n = len(idle)
            parts: list[list[int]] = [[] for _ in range(n)]
            acc = 0
            for i, size in enumerate(sizes):
                parts[min(n - 1, acc * n // total)].append(i)
                acc += size
            refs = {
                self.actors[w].decode.remote([blobs[i] for i in part]): (w, part)
                for w, part in zip(idle, parts)
                if part
            }
            results: list[bytes | None] = [None] * len(blobs)
            failures = 0
            deadline = time.monotonic() + timeout
            for ref, (w, part) in refs.items():
                try:
                    value = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except Exception as e:  # noqa: BLE001 - a dead actor, a lost node, a timeout
                    failures += 1
                    self.stats[w].failures += 1
                    log.warning("cluster worker %s failed a read (%s)", self.stats[w].name, type(e).__name__)
                    continue
                self.stats[w].decoded += sum(d is not None for d in value)
                for i, data in zip(part, value):
                    results[i] = data
            return {"results": results, "failures": failures, "workers": self.worker_stats()}
        finally:
            for w in idle:
                self._mark(w, -1)

    # -- compaction --------------------------------------------------------------------------------
    def encode_verified(self, datas, fingerprint, progress) -> list:
        """Split `datas` across the workers, encode, have the next worker decode each chunk, and
        return per item (container, verified) or None."""
        ray = self.ray
        if fingerprint != self.fingerprint:
            raise RuntimeError(
                f"the cluster holds model {self.fingerprint.hex()}, the store needs {fingerprint.hex()}"
            )
        n = len(self.actors)
        chunks: list[list[int]] = [[] for _ in range(n)]
        total = sum(len(d) for d in datas) or 1
        acc = 0
        for i, d in enumerate(datas):  # contiguous, about equal plaintext bytes each
            chunks[min(n - 1, acc * n // total)].append(i)
            acc += len(d)
        results: list = [None] * len(datas)
        done: dict[str, int] = {w.name: 0 for w in self.stats}
        # ref -> (step, chunk, worker, attempt, started, payload)
        inflight: dict = {}
        encoder: dict[int, int] = {}  # chunk -> the worker whose containers are being verified
        failed: set[int] = set()  # workers that failed since the last call that succeeded

        def submit(step, c, w, attempt, payload):
            actor = self.actors[w]
            if step == "encode":
                ref = actor.encode.remote([datas[i] for i in chunks[c]], fingerprint)
            else:
                ref = actor.decode.remote(payload)
            self._mark(w, 1)
            inflight[ref] = (step, c, w, attempt, time.monotonic(), payload)

        def finished(ref):
            item = inflight.pop(ref)
            self._mark(item[2], -1)
            return item

        def give_back(step, c, payload):
            if step == "decode":  # encoded, not verified: the daemon decodes them itself
                for i, blob in zip(chunks[c], payload):
                    results[i] = (blob, False)

        for c in range(n):
            if chunks[c]:
                submit("encode", c, c, 0, None)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            now = time.monotonic()
            if not ready:
                late = [r for r, v in inflight.items() if now - v[4] > self.timeout]
                for ref in late:
                    step, c, w, attempt, _, payload = finished(ref)
                    self.stats[w].failures += 1
                    log.warning("cluster worker %s timed out; restarting it", self.stats[w].name)
                    ray.kill(self.actors[w], no_restart=False)
                    if not self._retry(submit, step, c, w, attempt, payload, encoder.get(c)):
                        give_back(step, c, payload)
                continue
            ref = ready[0]
            step, c, w, attempt, started, payload = finished(ref)
            try:
                value = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a dead actor, a lost node, a raising method
                self.stats[w].failures += 1
                log.warning("cluster worker %s failed (%s)", self.stats[w].name, type(e).__name__)
                failed.add(w)
                if len(failed) == n:  # every worker failed since the last success: the cluster
                    give_back(step, c, payload)  # is gone; give the whole batch back now
                    for ref2 in list(inflight):
                        step2, c2, _w, _a, _t, payload2 = finished(ref2)
                        give_back(step2, c2, payload2)
                    break
                if not self._retry(submit, step, c, w, attempt, payload, encoder.get(c)):
                    give_back(step, c, payload)
                continue
            failed.clear()
            idx = chunks[c]
            if step == "encode":
                ws = self.stats[w]
                ws.seconds += now - started
                ws.blocks += len(idx)
                ws.plain += sum(len(datas[i]) for i in idx)
                done[ws.name] += sum(len(datas[i]) for i in idx)
                progress(dict(done))
                verifier = self._other(w)
                lm = [j for j, blob in enumerate(value) if peek_header(blob).codec_id == LM]
                if verifier is None or not lm:
                    for i, blob in zip(idx, value):  # nothing to verify remotely
                        results[i] = (blob, peek_header(blob).codec_id != LM)
                    continue
                encoder[c] = w
                submit("decode", c, verifier, 0, list(value))
            else:
                self.stats[w].verified += len(idx)
                for i, blob, data in zip(idx, payload, value):
                    if data == datas[i]:
                        results[i] = (blob, True)
                    else:
                        self.counters["mismatches"] += 1
                        log.error(
                            "cluster: a block encoded on one worker did not decode on worker %s",
                            self.stats[w].name,
                        )
                        results[i] = None
        return results

    def _other(self, w: int) -> int | None:
        """The worker that verifies worker w's chunk: the next one (None with a single worker)."""
        n = len(self.actors)
        return None if n < 2 else (w + 1) % n

    def _retry(self, submit, step, c, w, attempt, payload, encoded_by) -> bool:
        """Give a failed call to the next worker, a verifying decode never to the encoder; False
        when there is none left to try (an encode's blocks are then encoded by the daemon; a
        decode's containers go back unverified and the daemon verifies them itself)."""
        if attempt + 1 >= ATTEMPTS:
            return False
        n = len(self.actors)
        nxt = (w + 1) % n
        if step == "decode" and nxt == encoded_by:
            nxt = (nxt + 1) % n
            if nxt == encoded_by:
                return False
        self.counters["retries"] += 1
        submit(step, c, nxt, attempt + 1, payload)
        return True


# -- a cluster on this machine (tests, benchmarks, trying it out) ------------------------------


class LocalCluster:
    """A Ray head node on this machine, `ray start --head --block` in a session of its own, with
    `cpus` slots for worker actors; stop() kills the whole session (every process Ray started for
    it), so nothing outlives it. Small by design: no dashboard, a 75 MiB object store."""

    def __init__(self, cpus: int = 2, pythonpath: list[str] | None = None):
        import shutil
        import signal
        import socket
        import subprocess
        import sys
        import tempfile

        self._signal, self._subprocess, self._shutil = signal, subprocess, shutil
        self.tmp = tempfile.mkdtemp(prefix="llmfs-ray-", dir="/tmp")  # short: socket paths
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        if pythonpath:  # what the workers must import (a test's model factory)
            env["PYTHONPATH"] = os.pathsep.join(pythonpath + sys.path)
        self.log_path = os.path.join(self.tmp, "head.log")
        self._log = open(self.log_path, "wb")
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        self.proc = subprocess.Popen(
            [
                ray_cli,
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={cpus}",
                "--num-gpus=0",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={self.tmp}",
                "--object-store-memory=78643200",
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.proc.pid

    def stop(self) -> None:
        """Kill every process of the head's session (idempotent)."""
        signal = self._signal
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not self.pids():
                    break
                time.sleep(0.2)
        self.proc.wait()
        self._log.close()
        self._shutil.rmtree(self.tmp, ignore_errors=True)

    def pids(self) -> list[int]:
        """Processes still in the head's session."""
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.getpgid(int(name)) == self.pgid:
                        out.append(int(name))
                except (ProcessLookupError, PermissionError):
                    pass
        return out
