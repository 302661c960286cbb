"""Measure the exact engine: tokens/s of freqs (parallel, batch of 1024-token segments) and of step
(batched incremental decoding) against the peaks measured in the same run, and bits/token of the
exact engine vs the float32 reference on real text.

    .venv/bin/python bench/engine_bench.py [--threads 1] [--backend auto|vnni|avx2|blas|intmm]
                                           [--batch 2] [--step-batch 16] [--steps 64]
                                           [--step-from 0] [--segments 2] [FILE ...]

"% of peak" is llmfs.codec.bench's definition (Peaks, measure_peaks, ops_per_token): ~270 MOP per
token for SmolLM2-135M against the peak of the backend that ran, one core times the threads used,
and beside it the float32 GEMM peak measured in the same run. --backend sets LLMFS_BACKEND.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmfs.codec import bench  # noqa: E402
from llmfs.codec.lm import backend, loader, reference  # noqa: E402

DEFAULT_FILES = ["/usr/share/common-licenses/GPL-3", "/usr/lib/python3.11/argparse.py"]


def int8_peak(seconds: float = 1.0) -> float:
    """Best int8 _int_mm throughput (ops/s, ops = 2*M*N*K) on the model's GEMM shapes."""
    best = 0.0
    for m, k, n in [(1024, 576, 1536), (1024, 1536, 576)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()
        torch._int_mm(a, b)
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 2:
            t1 = time.perf_counter()
            torch._int_mm(a, b)
            best = max(best, 2 * m * n * k / (time.perf_counter() - t1))
            reps += 1
    return best


def ops_per_token(c) -> float:
    """The roofline's ops per token: llmfs.codec.bench.ops_per_token (one definition)."""
    return bench.ops_per_token(c)


def segments_of(tok, bos: int, path: str, seg_tokens: int, limit: int) -> list[list[int]]:
    text = open(path, encoding="utf-8", errors="replace").read()
    ids = tok.encode(text).ids
    body = seg_tokens - 1
    return [[bos] + ids[i : i + body] for i in range(0, len(ids), body)][:limit]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", default=DEFAULT_FILES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2, help="segments per freqs call")
    ap.add_argument("--seg-tokens", type=int, default=1024)
    ap.add_argument("--step-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument(
        "--step-from",
        type=int,
        default=0,
        help="position the timed steps start at (the steps before it run untimed): "
        "decoding attention grows with the position, a segment averages ~512",
    )
    ap.add_argument("--segments", type=int, default=2, help="segments per file for bits/token")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--backend", default=None, help="force a GEMM backend (LLMFS_BACKEND)")
    a = ap.parse_args(argv)
    if a.backend:
        os.environ[backend.ENV] = a.backend
    torch.set_num_threads(1)  # the engine's own threads (no OpenMP spin-waits)

    m = loader.load()
    e = m.engine
    e.threads = a.threads
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(m.tokenizer_json)
    segs = {f: segments_of(tok, e.bos_id, f, a.seg_tokens, a.segments) for f in a.files}
    opt = ops_per_token(e.config)
    peaks = bench.measure_peaks(e, a.threads)
    print(f"threads {a.threads}; " + peaks.describe(opt))
    pct = lambda tps: (
        f"{peaks.pct(tps, opt):5.1f} % of the backend's peak, {peaks.pct_f32(tps, opt):5.1f} % of float32's"
    )

    # encoding: one parallel pass over a batch of full segments
    allsegs = [s for v in segs.values() for s in v if len(s) == a.seg_tokens]
    batch = torch.tensor((allsegs * a.batch)[: a.batch])
    e.freqs(batch[:, :64])  # warm up
    t0 = time.perf_counter()
    e.freqs(batch)
    dt = time.perf_counter() - t0
    tps = batch.numel() / dt
    print(f"freqs  batch {a.batch}x{a.seg_tokens}: {tps:7.0f} tokens/s = {pct(tps)}")

    # decoding: step a batch of rows through positions step_from .. step_from + steps - 1
    end = a.step_from + a.steps
    state = e.start(a.step_batch, end)
    rows = batch[torch.arange(a.step_batch) % batch.shape[0], :end]
    e.step(e.start(a.step_batch, 1), rows[:, 0])  # warm up
    for t in range(a.step_from):
        e.step(state, rows[:, t])
    t0 = time.perf_counter()
    for t in range(a.step_from, end):
        e.step(state, rows[:, t])
    dt = time.perf_counter() - t0
    tps = a.step_batch * a.steps / dt
    print(
        f"step   batch {a.step_batch}, positions {a.step_from}..{end - 1}: {tps:7.0f} tokens/s = "
        f"{pct(tps)} ({dt / a.steps * 1e3:.0f} ms/step)"
    )

    if a.no_reference:
        return
    for f, ss in segs.items():
        n = sum(len(s) - 1 for s in ss)
        ex = reference.exact_bits(e, ss)
        fl = reference.cross_entropy_bits(m, ss)
        print(
            f"{os.path.basename(f):14s} {n:6d} tokens: exact {ex / n:.4f} bits/token, "
            f"float32 {fl / n:.4f}, exact/float {(ex / fl - 1) * 100:+.2f} %"
        )


if __name__ == "__main__":
    main()
