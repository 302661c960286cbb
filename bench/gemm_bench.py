"""The avx2 backend's GEMM kernels (kernels.c gemm_packed form 3 and gemm_packed16) in GOP/s per
CPU-second of this thread, against the float32 GEMM peak measured in the same run, and, with
--baseline REF, against kernels.c as it was at git revision REF built and loaded in the same process
(so that the before/after ratio is measured under the same load).

    .venv/bin/python bench/gemm_bench.py [--baseline main] [--rows 1 3 16 64 1024] [--seconds 0.3]

Shapes: SmolLM2-135M's layers (K -> N): qkv 576 -> 960, o 576 -> 576, gate_up 576 -> 3072,
down 1536 -> 576, and at few rows the LM head 576 -> 49152. Few rows (<= 256) cycle through 8
weights per shape, as decoding does through its layers', so the weights come from L3/memory as
there; many rows use one weight. int16: gemm_packed16's stacked hi/lo rows, each pair counted once
(the useful operations). Both builds are the AVX2-only build (-DLLMFS_NO_AVX512).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmfs.codec import bench as cbench  # noqa: E402
from llmfs.codec.lm import backend, kernels  # noqa: E402

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
HEAD = (576, 49152)


def build_at(ref: str, tmp: Path) -> ctypes.CDLL:
    """kernels.c at git revision `ref`, AVX2-only build, loaded."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(
        ["git", "show", f"{ref}:codec/lm/kernels.c"], cwd=root, capture_output=True, check=True
    ).stdout
    c = tmp / "kernels-base.c"
    c.write_bytes(src)
    out = tmp / "kernels-base.so"
    cc = kernels._compiler()
    flags = kernels.CFLAGS + ["-DLLMFS_NO_AVX512"]
    subprocess.run([cc, *flags, "-o", str(out), str(c), "-lm"], check=True)
    return kernels.load(out)


def rate(lib, kind: str, rows: int, K: int, N: int, seconds: float) -> float:
    g = torch.Generator().manual_seed(rows + K + N)
    nw = 8 if rows <= 256 else 1
    if K * N > 10_000_000:
        nw = 1
    ws = [
        backend.pack_weight(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g))
        for _ in range(nw)
    ]
    if kind == "int8":
        a = torch.randint(-127, 128, (rows, K), dtype=torch.int8, generator=g)
        one = lambda w: backend.gemm_packed(lib, "avx2", a, w, N)
    else:
        a = torch.randint(-127, 128, (2 * rows, K), dtype=torch.int8, generator=g)
        one = lambda w: backend.gemm_packed16(lib, a, w, N)
    assert one(ws[0]) is not None
    run = lambda: [one(w) for w in ws]
    return 2 * rows * K * N * nw / backend.best_time(run, seconds) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", help="git revision whose kernels.c to compare against")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 3, 16, 64, 1024])
    ap.add_argument("--seconds", type=float, default=0.3)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES) + ["head"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    libs = {"new": kernels.lib("noavx512")}
    with tempfile.TemporaryDirectory() as t:
        if args.baseline:
            libs = {"base": build_at(args.baseline, Path(t)), **libs}
        f32 = cbench.f32_peak_flops("cpu", 1.0) / 1e9
        print(f"CPU {backend.cpu_model()}; float32 GEMM peak (1024x576x1536, 1 thread) {f32:.1f} GFLOP/s")
        hdr = "shape kind rows " + " ".join(f"{n}_GOP/s {n}/f32" for n in libs)
        print(hdr + (" new/base" if "base" in libs else ""))
        for s in args.shapes:
            K, N = HEAD if s == "head" else SHAPES[s]
            for kind in ("int8", "int16"):
                for rows in args.rows:
                    if s == "head" and rows > 64:
                        continue
                    r = {n: rate(lib, kind, rows, K, N, args.seconds) for n, lib in libs.items()}
                    line = f"{s} {kind} {rows} " + " ".join(f"{v:.1f} {v / f32:.2f}" for v in r.values())
                    if "base" in r:
                        line += f" {r['new'] / r['base']:.2f}"
                    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
