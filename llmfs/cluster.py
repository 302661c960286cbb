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

Process layout: the Ray driver does not run in the FUSE daemon but in a child process (`_driver`).
A Ray driver exits its process when it loses its raylet or the GCS; in a child that only closes a
pipe, and the daemon's compactor falls back to local encoding (and tries the cluster again after
RECONNECT_SECONDS) — reads and writes never wait on the cluster. The child also keeps Ray's
threads, signal handlers and memory out of the daemon.

Threading: ClusterCoder is called by the compactor's thread (one batch at a time: the compactor
takes turns under its own lock) and read by `stats()` from control threads; a lock guards the pipe.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
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

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rate"] = self.plain / self.seconds if self.seconds else 0.0
        for w, ws in zip(d["workers"], self.workers):
            w["rate"] = ws.rate
        return d


# -- the daemon's side -------------------------------------------------------------------------


class ClusterCoder:
    """The compactor's remote coder. encode_many() returns, per plaintext, (container, verified) or
    None where the cluster could not do it (the compactor then encodes that block locally)."""

    def __init__(
        self,
        address: str,
        model: str | Callable,
        workers: int = 0,
        timeout: float = TIMEOUT,
        device: str = "auto",
        threads: int = 1,
        reconnect: float = RECONNECT_SECONDS,
    ):
        """model: a spec for codec.lm.open_codec (the store's), or for tests a picklable callable
        that returns a codec. workers: 0 = one per GPU of the cluster, one per CPU-only node."""
        self.address, self.model = address, model
        self.workers, self.timeout = workers, timeout
        self.device, self.threads, self.reconnect = device, threads, reconnect
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._down_since: float | None = None
        self._stats = ClusterStats(address)
        self._progress: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the driver process and wait until its workers hold the model (or it failed).
        Never raises: a cluster that cannot be reached is reported and tried again later."""
        with self._lock:
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
        self._proc, self._conn = proc, parent
        self._stats.state = "connecting"
        try:
            reply = self._receive(START_TIMEOUT)
        except ClusterUnavailable as e:
            self._fail(str(e))
            return
        if "error" in reply:
            self._fail(reply["error"])
            return
        self._stats.workers = [WorkerStats(**w) for w in reply["workers"]]
        self._stats.state, self._stats.error, self._down_since = "ready", "", None
        log.info(
            "cluster %s: %d worker(s): %s",
            self.address,
            len(self._stats.workers),
            ", ".join(f"{w.name} on {w.host} ({w.device})" for w in self._stats.workers),
        )

    def _fail(self, why: str) -> None:
        log.warning(
            "cluster %s is not available (%s); compacting locally, trying again in %.0f s",
            self.address,
            why,
            self.reconnect,
        )
        self._stats.state, self._stats.error = "unavailable", why
        self._down_since = time.monotonic()
        for w in self._stats.workers:
            w.alive = False
        self._close_locked()

    def close(self) -> None:
        """Stop the driver (its actors go with it). Does not wait for a batch in flight: the
        driver is killed under it and the compactor drops the batch."""
        if self._lock.acquire(timeout=1.0):
            try:
                self._close_locked()
            finally:
                self._lock.release()
            return
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def _close_locked(self) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            try:
                conn.send({"op": "stop"})
            except OSError:
                pass
            conn.close()
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def _receive(self, timeout: float) -> dict:
        try:
            if not self._conn.poll(timeout):
                raise ClusterUnavailable(f"no answer from the cluster driver in {timeout:.0f} s")
            return self._conn.recv()
        except (EOFError, OSError) as e:
            raise ClusterUnavailable(f"the cluster driver exited ({e or 'pipe closed'})") from None

    def _ready_locked(self) -> bool:
        if self._conn is not None:
            return True
        if self._down_since is not None and time.monotonic() - self._down_since < self.reconnect:
            return False
        self._start_locked()
        return self._conn is not None

    # -- work ------------------------------------------------------------------------------------
    def encode_many(
        self,
        datas: list[bytes],
        fingerprint: bytes,
    ) -> list[tuple[bytes, bool] | None]:
        """Containers of `datas` made by the cluster with the model `fingerprint`: (container,
        True) verified by another worker, (container, False) to be verified by the caller, None
        where the cluster could not (the caller encodes it itself)."""
        with self._lock:
            if not datas or not self._ready_locked():
                self._stats.local_fallbacks += len(datas)
                return [None] * len(datas)
            t0 = time.perf_counter()
            base = {w.name: w.plain for w in self._stats.workers}
            try:
                self._conn.send({"op": "encode", "datas": datas, "fingerprint": fingerprint})
                while True:
                    reply = self._receive(self.timeout * ATTEMPTS + 60)
                    if "progress" in reply:
                        self._progress = {k: base.get(k, 0) + v for k, v in reply["progress"].items()}
                        continue
                    break
            except (ClusterUnavailable, OSError) as e:
                self._fail(str(e))
                self._stats.local_fallbacks += len(datas)
                return [None] * len(datas)
            if "error" in reply:
                self._fail(reply["error"])
                self._stats.local_fallbacks += len(datas)
                return [None] * len(datas)
            self._progress = {}
            out = self._check(datas, fingerprint, reply)
            self._stats.batches += 1
            self._stats.seconds += time.perf_counter() - t0
            if all(r is None for r in out) and reply["retries"]:
                # every worker failed every try: the cluster is gone or going; stop asking it
                # (and paying a timeout per batch) until RECONNECT_SECONDS have passed
                self._fail("no worker could take the batch")
            return out

    def _check(self, datas, fingerprint, reply) -> list[tuple[bytes, bool] | None]:
        """Merge the driver's answer into the stats and check every header here: the daemon swaps
        in nothing whose length, checksum or model is not what it asked for."""
        st = self._stats
        st.workers = [WorkerStats(**w) for w in reply["workers"]]
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

    # -- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        return self._stats.as_dict()

    def progress(self) -> dict[str, int]:
        """Plaintext bytes each worker has encoded since the mount, the batch in flight included."""
        done = {w.name: w.plain for w in self._stats.workers}
        done.update(self._progress)
        return done


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
    """The child process: connect, start the actors, serve encode requests until told to stop or
    the pipe closes."""
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
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            break
        if req.get("op") != "encode":
            break
        try:
            results = pool.encode_verified(
                req["datas"], req["fingerprint"], lambda p: conn.send({"progress": p})
            )
            conn.send(
                {
                    "results": results,
                    "workers": pool.worker_stats(),
                    "mismatches": pool.take("mismatches"),
                    "retries": pool.take("retries"),
                }
            )
        except Exception as e:  # noqa: BLE001
            conn.send({"error": f"{type(e).__name__}: {e}"})
    pool.shutdown()


class _Pool:
    """The driver's actors and the encode → verify pipeline across them."""

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

    def worker_stats(self) -> list[dict]:
        return [asdict(w) for w in self.stats]

    def take(self, key: str) -> int:
        n, self.counters[key] = self.counters[key], 0
        return n

    def shutdown(self) -> None:
        try:
            for a in self.actors:
                self.ray.kill(a, no_restart=True)
            self.ray.shutdown()
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            pass

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
            inflight[ref] = (step, c, w, attempt, time.monotonic(), payload)

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
                    step, c, w, attempt, _, payload = inflight.pop(ref)
                    self.stats[w].failures += 1
                    log.warning("cluster worker %s timed out; restarting it", self.stats[w].name)
                    ray.kill(self.actors[w], no_restart=False)
                    if not self._retry(submit, step, c, w, attempt, payload, encoder.get(c)):
                        give_back(step, c, payload)
                continue
            ref = ready[0]
            step, c, w, attempt, started, payload = inflight.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a dead actor, a lost node, a raising method
                self.stats[w].failures += 1
                log.warning("cluster worker %s failed (%s)", self.stats[w].name, type(e).__name__)
                failed.add(w)
                if len(failed) == n:  # every worker failed since the last success: the cluster
                    give_back(step, c, payload)  # is gone; give the whole batch back now
                    for step2, c2, _w, _a, _t, payload2 in inflight.values():
                        give_back(step2, c2, payload2)
                    inflight.clear()
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
