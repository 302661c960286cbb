"""Where a real batched decode spends its time: bench/decode_bench.py's workload (LMCodec.decode_many
over 64 KiB blocks of real text, cached payloads) with timers around the engine's parts and the
decode loop's, split by position range.

    .venv/bin/python bench/decode_profile.py --batch 64 [--threads 1]

Timers wrap Python-level calls (a few microseconds each, ~1000 per step: well below 1 % of a step).
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmfs.codec.lm import coder, open_codec  # noqa: E402

from bench.engine_bench import int8_peak, ops_per_token  # noqa: E402

T = collections.defaultdict(float)
N = collections.defaultdict(int)


def timed(name, fn):
    def wrap(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            T[name] += time.perf_counter() - t0
            N[name] += 1

    return wrap


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--payloads", default="/tmp/llmfs-decode-bench-{fingerprint}.pkl")
    a = ap.parse_args(argv)
    codec = open_codec(None, batch=a.batch, threads=a.threads, device="cpu")
    blocks, payloads = pickle.load(open(a.payloads.format(fingerprint=codec.fingerprint.hex()), "rb"))
    eng = codec.engine
    ops = eng._ops

    # GEMMs by weight name (Engine._matmul: packed kernel or torch._int_mm)
    orig_matmul = eng._matmul

    def matmul(q, name):
        parts = name.split(".")  # l{i}.{layer}.q, or tok_emb.q / lm_head.q
        kind = parts[1] if len(parts) == 3 else "head"
        t0 = time.perf_counter()
        r = orig_matmul(q, name)
        T["gemm " + kind] += time.perf_counter() - t0
        return r

    eng._matmul = matmul
    c = eng.config
    for m in ["quant_rows", "rmsnorm_quant", "combine", "swiglu_quant", "qkv_post", "attend", "head_freqs"]:
        setattr(ops, m, timed("op " + m, getattr(ops, m)))
    eng._head = timed("head total", eng._head)
    eng._embed = timed("embed", eng._embed)
    orig_layer = eng._layer
    eng._layer = timed("layers total", orig_layer)

    # the decode loop's parts
    step_times = []
    orig_step = eng.step

    def step(state, tokens):
        t0 = time.perf_counter()
        r = orig_step(state, tokens)
        dt = time.perf_counter() - t0
        T["engine.step"] += dt
        step_times.append((int(state.pos.max()) - 1, tokens.shape[0], dt))
        return r

    eng.step = step
    orig_cp = coder.coding_probabilities
    coder.coding_probabilities = timed("coder: int32->float64", orig_cp)
    orig_dec = coder.StreamDecoder.decode
    coder.StreamDecoder.decode = timed("coder: decode (incl. conversion)", orig_dec)

    # Python's cyclic garbage collector (collections triggered by the loop's allocations)
    def gc_timer(phase, info):
        if phase == "start":
            gc_timer.t0 = time.perf_counter()
        else:
            T["python gc"] += time.perf_counter() - gc_timer.t0
            N["python gc"] += 1

    gc.callbacks.append(gc_timer)

    segs = [codec.segments(b) for b in blocks]
    ntok = sum(len(s) for ss in segs for s in ss)
    opt = ops_per_token(c)
    peak = int8_peak()
    t0 = time.perf_counter()
    out = codec.decode_many([(p, len(b)) for p, b in zip(payloads, blocks)])
    dt = time.perf_counter() - t0
    assert out == blocks
    tps = ntok / dt
    print(
        f"decode_many batch {a.batch}: {ntok} tokens in {dt:.1f} s = {tps:.0f} tokens/s = "
        f"{tps * opt / peak * 100:.1f} % of int8 peak ({peak / 1e9:.0f} GOP/s); "
        f"{len(step_times)} steps"
    )
    print(f"{'part':36s} {'s':>7s} {'%':>6s} {'ms/step':>8s}")
    n = len(step_times)
    order = sorted(T, key=lambda k: -T[k])
    for k in order:
        print(f"{k:36s} {T[k]:7.2f} {T[k] / dt * 100:6.1f} {T[k] / n * 1e3:8.2f}")
    rest = dt - T["engine.step"] - T["coder: decode (incl. conversion)"]
    print(
        f"{'decode loop rest (python, feed, ...)':36s} {rest:7.2f} {rest / dt * 100:6.1f} "
        f"{rest / n * 1e3:8.2f}"
    )
    layer_rest = (
        T["layers total"]
        - sum(v for k, v in T.items() if k.startswith("gemm ") and k != "gemm head")
        - sum(
            T[k]
            for k in [
                "op quant_rows",
                "op rmsnorm_quant",
                "op combine",
                "op swiglu_quant",
                "op qkv_post",
                "op attend",
            ]
        )
    )
    # rmsnorm_quant / combine also run in the head: approximate, counted in layers above
    print(f"{'layers: unwrapped rest (kv write..)':36s} {layer_rest:7.2f}")
    # by position range and batch
    buckets = collections.defaultdict(lambda: [0, 0.0, 0])
    for p, b, t in step_times:
        key = (min(p // 256, 3), b >= a.batch)
        buckets[key][0] += 1
        buckets[key][1] += t
        buckets[key][2] += b
    for key in sorted(buckets):
        k, t, rows = buckets[key]
        print(
            f"positions {key[0] * 256:4d}..{key[0] * 256 + 255:4d} full batch {key[1]!s:5s}: "
            f"{k:5d} steps, {t:7.2f} s, {t / k * 1e3:6.1f} ms/step"
        )


if __name__ == "__main__":
    main()
