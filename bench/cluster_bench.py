"""Compaction throughput through a Ray cluster of local workers vs the in-daemon compactor.

    .venv/bin/python bench/cluster_bench.py [--size 32K] [--block-size 8K] [--workers 0,1,2]
                                            [--model SPEC] [--address HOST:PORT]

Writes --size bytes of real text (llmfs.bench.text_corpus) into a fresh store for each run and
compacts all of it with the store's model (default SmolLM2-135M): once with the compactor alone
(workers 0: encode and verify in this process, as the daemon does), and once through a cluster of
N worker actors (`--address`: an existing cluster; else a local head this script starts and
stops). With one worker the daemon still verifies locally (a container is swapped in only after a
decode somewhere other than its encoder); with two or more, another worker verifies. Then a cold
read: the daemon alone reads the file back through a fresh filesystem (decoding here); each
cluster run first takes the daemon's start-up measurement (ClusterCoder.calibrate: would reads go
there?) and then decodes the file's LM blocks on the cluster as one read's batch, checked against
the text. --fsck also runs fsck on each store (another decode of everything).

Prints KiB/s of plaintext per configuration, KiB per CPU-second (this process, the driver, and
every process of the local head: what a configuration costs whatever else the machine runs), and
the ratios to the in-daemon compactor measured in the same run: on a shared machine the absolute numbers are noise, the ratios carry over. On one
machine the workers share its cores: N workers on 2 cores cannot exceed 2x, and the daemon's own
work competes with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

from llmfs.codec import LM, Registry
from llmfs.codec.lm import DEFAULT_MODEL
from llmfs.codec.registry import peek_header

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.bench import text_corpus
from llmfs.cluster import ClusterCoder, LocalCluster
from llmfs.compactor import Compactor
from llmfs.models import Models, store_spec
from llmfs.store import ROOT_INO, Store
from llmfs.units import parse_size


def fill(path: str, block_size: int, model: str, text: bytes) -> None:
    Store.create(path, block_size, model)
    store = Store(path)
    try:
        fs = ns.Filesystem(store, Registry())
        fh = fs.create(ROOT_INO, b"text", 0o644, os.O_RDWR, 0, 0)
        fs.write(fh, text, 0)
        fs.release(fh)
        fs.flush_all()
    finally:
        store.close()


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each process still there (its threads included)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


class CpuMeter:
    """CPU seconds of this process, the cluster driver (a child) and every process of the local
    head's session (raylet, GCS, the worker actors): what a configuration costs in CPU, whatever
    else the shared machine runs."""

    def __init__(self, head: LocalCluster | None, coder: ClusterCoder | None):
        self.head, self.coder = head, coder

    def _pids(self) -> list[int]:
        """This process and its descendants (the driver), the head's session, and the
        descendants of both (the raylet's worker processes)."""
        parent = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    pass
        roots = {os.getpid()} | (set(self.head.pids()) if self.head is not None else set())
        found, grew = set(roots), True
        while grew:
            more = {pid for pid, pp in parent.items() if pp in found and pid not in found}
            found |= more
            grew = bool(more)
        return sorted(found)

    def start(self) -> None:
        self.t0 = cpu_seconds(self._pids())

    def stop(self) -> float:
        now = cpu_seconds(self._pids())
        return sum(v - self.t0.get(pid, 0.0) for pid, v in now.items())


def run_once(
    path: str,
    text: bytes,
    coder: ClusterCoder | None,
    head: LocalCluster | None,
    fsck_too: bool,
    read_too: bool = True,
) -> dict:
    store = Store(path)
    try:
        models = Models(store)
        registry = Registry(model_resolver=models.resolve)
        compactor = Compactor(store, registry, models.compaction_codec, store_spec(store), compact_after=0)
        models.compaction_codec()  # load before timing: the daemon holds the model already
        compactor.remote = coder
        meter = CpuMeter(head, coder)
        meter.start()
        t0 = time.perf_counter()
        # on a thread of its own, as in the daemon: compact() lowers its thread's priority to 19
        # for good, and the cold read below must not inherit that
        box = {}
        worker = threading.Thread(target=lambda: box.update(res=compactor.compact(compactor.candidates())))
        worker.start()
        worker.join()
        res = box["res"]
        secs = time.perf_counter() - t0
        cpu = meter.stop()
        local_registry = Registry(model_resolver=Models(store).resolve)
        fs = ns.Filesystem(store, local_registry, None)
        ino = fs.lookup(ROOT_INO, b"text")
        out = {
            "seconds": secs,
            "cpu": cpu,
            "lm_blocks": res.lm_blocks,
            "blocks": res.blocks,
            "before": res.before,
            "after": res.after,
        }
        with store.read() as t:
            hashes = t.block_hashes(ino, 0, len(text) // store.block_size)
            blobs = [bytes(t.container(hashes[i])) for i in sorted(hashes)]
        lm = [b for b in blobs if peek_header(b).codec_id == LM]
        if not lm or not read_too:
            out["read_seconds"] = 0.0
        elif coder is None:  # the cold read decoded here (the other runs read the same text)
            t0 = time.perf_counter()
            assert fs.read_ino(ino, len(text) + 1, 0) == text, "read back differs"
            out["read_seconds"] = time.perf_counter() - t0
        else:  # a cold read's batch decoded on the cluster, as ClusterCoder.decode_many sends it
            coder.local_decode = local_registry.decode_many
            coder.calibrate()
            out["reads_go_there"] = coder.worth_it(len(lm))
            t0 = time.perf_counter()
            got = coder._decode_remote(lm, 3600.0)
            out["read_seconds"] = time.perf_counter() - t0
            assert got is not None and all(g is not None for g in got), "the cluster did not decode"
            # checked against the text itself (the daemon alone's run decoded it here already)
            plain = iter(got)
            assert (
                b"".join(
                    next(plain) if peek_header(b).codec_id == LM else local_registry.decode(b) for b in blobs
                )
                == text
            )
        out["read_bytes"] = sum(peek_header(b).length for b in lm) if out["read_seconds"] else 0
        if fsck_too:
            problems, _ = fsck.run_checks(store, registry=registry)
            assert not problems, [p.message for p in problems]
        out["cluster"] = coder.stats() if coder else None
        return out
    finally:
        store.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("128K"))
    p.add_argument("--block-size", type=parse_size, default=parse_size("64K"))
    p.add_argument("--workers", default="0,1,2", help="comma-separated; 0 = the daemon alone")
    p.add_argument("--model", default="", help="the store's model (default SmolLM2-135M)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start one)")
    p.add_argument("--fsck", action="store_true", help="fsck each store afterwards (decodes it all again)")
    p.add_argument("--no-read", action="store_true", help="compaction only, no cold-read decode")
    args = p.parse_args()
    text = text_corpus(args.size)
    counts = [int(x) for x in args.workers.split(",")]
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    print(
        f"cluster bench: {len(text)} bytes of text, blocks of {args.block_size}, model "
        f"{args.model or 'default'}; CPU {cpu}, {os.cpu_count()} cores (shared: noisy)"
    )
    head = None
    rows = []
    try:
        if any(counts) and args.address is None:
            head = LocalCluster(cpus=max(counts))
        for n in counts:
            with tempfile.TemporaryDirectory(prefix="llmfs-cbench-") as tmp:
                path = os.path.join(tmp, "store")
                fill(path, args.block_size, args.model, text)
                coder = None
                if n:
                    coder = ClusterCoder(
                        args.address or head.address, args.model or DEFAULT_MODEL, workers=n, device="cpu"
                    )
                    t0 = time.perf_counter()
                    coder.start()
                    start = time.perf_counter() - t0
                    if coder.stats()["state"] != "ready":
                        print(f"{n} worker(s): cluster not ready: {coder.stats()['error']}")
                        continue
                try:
                    r = run_once(
                        path, text, coder, head if args.address is None else None, args.fsck, not args.no_read
                    )
                finally:
                    if coder:
                        coder.close()
                rate = len(text) / r["seconds"] / 1024
                per_cpu = len(text) / r["cpu"] / 1024 if r["cpu"] else 0.0
                read_rate = r["read_bytes"] / r["read_seconds"] / 1024 if r["read_seconds"] else 0.0
                rows.append((n, rate, per_cpu, read_rate))
                extra = f", workers started in {start:.0f} s" if n else ""
                print(
                    f"{'daemon alone' if not n else f'{n} worker(s)':<14} compaction {rate:7.3f} KiB/s, "
                    f"{per_cpu:.3f} KiB per CPU-second ({r['seconds']:.1f} s, {r['cpu']:.1f} CPU-s, "
                    f"{r['lm_blocks']}/{r['blocks']} blocks by the LM, {r['before']} -> {r['after']} "
                    f"bytes{extra})"
                )
                where = "here" if not n else "on the cluster"
                print(
                    f"{'':<14} cold read: {r['read_bytes']} bytes of LM blocks decoded {where} at {read_rate:.3f} KiB/s"
                )
                if n and "reads_go_there" in r:
                    cl = r["cluster"]
                    print(
                        f"{'':<14} start-up measurement: {cl['decode_remote_rate']:.0f} B/s per worker there, "
                        f"{cl['decode_local_rate']:.0f} B/s here; reads of this file "
                        f"{'go to the cluster' if r['reads_go_there'] else 'stay local'}"
                    )
    finally:
        if head is not None:
            head.stop()
    base = {n: (rate, per_cpu, read) for n, rate, per_cpu, read in rows}.get(0)
    if base:
        for n, rate, per_cpu, read in rows:
            if n:
                print(
                    f"{n} worker(s) / daemon alone: compaction {rate / base[0]:.2f}x, per CPU-second "
                    f"{per_cpu / base[1]:.2f}x, cold-read decode {read / base[2] if base[2] else 0:.2f}x"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
