"""Compaction throughput through a Ray cluster of local workers vs the in-daemon compactor.

    .venv/bin/python bench/cluster_bench.py [--size 32K] [--block-size 8K] [--workers 0,1,2]
                                            [--model SPEC] [--address HOST:PORT]

Writes --size bytes of real text (llmfs.bench.text_corpus) into a fresh store for each run and
compacts all of it with the store's model (default SmolLM2-135M): once with the compactor alone
(workers 0: encode and verify in this process, as the daemon does), and once through a cluster of
N worker actors (`--address`: an existing cluster; else a local head this script starts and
stops). With one worker the daemon still verifies locally (a container is swapped in only after a
decode somewhere other than its encoder); with two or more, another worker verifies. Every run
ends with every block read back through a fresh filesystem and fsck.

Prints KiB/s of plaintext per configuration and the ratio to the in-daemon compactor measured in
the same run: on a shared machine the absolute numbers are noise, the ratios carry over. On one
machine the workers share its cores: N workers on 2 cores cannot exceed 2x, and the daemon's own
work competes with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from llmfs.codec import Registry

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.bench import text_corpus
from llmfs.cluster import ClusterCoder, LocalCluster
from llmfs.compactor import Compactor
from llmfs.models import DEFAULT_SPEC, Models, store_spec
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


def run_once(path: str, text: bytes, coder: ClusterCoder | None) -> dict:
    store = Store(path)
    try:
        models = Models(store)
        registry = Registry(model_resolver=models.resolve)
        compactor = Compactor(store, registry, models.compaction_codec, store_spec(store), compact_after=0)
        models.compaction_codec()  # load before timing: the daemon holds the model already
        compactor.remote = coder
        t0 = time.perf_counter()
        res = compactor.compact(compactor.candidates())
        secs = time.perf_counter() - t0
        fs = ns.Filesystem(store, Registry(model_resolver=Models(store).resolve), None)
        ino = fs.lookup(ROOT_INO, b"text")
        assert fs.read_ino(ino, len(text) + 1, 0) == text, "read back differs"
        problems, _ = fsck.run_checks(store, registry=registry)
        assert not problems, [p.message for p in problems]
        return {
            "seconds": secs,
            "lm_blocks": res.lm_blocks,
            "blocks": res.blocks,
            "before": res.before,
            "after": res.after,
            "cluster": coder.stats() if coder else None,
        }
    finally:
        store.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("32K"))
    p.add_argument("--block-size", type=parse_size, default=parse_size("8K"))
    p.add_argument("--workers", default="0,1,2", help="comma-separated; 0 = the daemon alone")
    p.add_argument("--model", default="", help="the store's model (default SmolLM2-135M)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start one)")
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
                        args.address or head.address, args.model or DEFAULT_SPEC, workers=n, device="cpu"
                    )
                    t0 = time.perf_counter()
                    coder.start()
                    start = time.perf_counter() - t0
                    if coder.stats()["state"] != "ready":
                        print(f"{n} worker(s): cluster not ready: {coder.stats()['error']}")
                        continue
                try:
                    r = run_once(path, text, coder)
                finally:
                    if coder:
                        coder.close()
                rate = len(text) / r["seconds"] / 1024
                rows.append((n, rate))
                extra = f", workers started in {start:.0f} s" if n else ""
                print(
                    f"{'daemon alone' if not n else f'{n} worker(s)':<14} {rate:7.2f} KiB/s  "
                    f"({r['seconds']:.1f} s, {r['lm_blocks']}/{r['blocks']} blocks by the LM, "
                    f"{r['before']} -> {r['after']} bytes{extra})"
                )
    finally:
        if head is not None:
            head.stop()
    base = dict(rows).get(0)
    if base:
        for n, rate in rows:
            if n:
                print(f"{n} worker(s) / daemon alone: {rate / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
