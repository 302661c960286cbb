"""`llmfs bench codec FILE...`: the LM codec against xz / zstd / brotli and its own float floor.

Everything in one report is measured in one run on the same bytes: raw size, xz -9e, zstd -19,
brotli -11, the LM container of the bare model ("bare": payload version 2, the engine's rows as
they are) and of the full codec ("lm": version 3, rows mixed with the online side models of
codec/lm/mixer.py), both in bytes and bits per byte, the float32 model's cross-entropy on the very
segments the codec codes (codec/lm/reference.py — the bare model's floor, which the exact engine
should stay within ~1 % of and the full codec should go below), the full codec's encode and decode
speed in tokens/s, those speeds against the bare model's measured in the same run ("enc/bare"), and
as a fraction of this machine's int8 GEMM peak, also measured in this run.

Ops per token (stated in the output):
    2 × (non-embedding params + output-head params)          the GEMMs: q,k,v,o, gate/up/down, head
  + 4 × n_layer × n_head × head_dim × mean context            QKᵀ and PV over the segment so far
with mean context = (segment length + 1) / 2. For SmolLM2-135M at 1024 tokens: ≈ 269 + 57 MOP.

Structure: `llmfs bench` has its own subcommands. `bench_subparsers(subparsers)` returns them,
creating the `bench` parser the first time, so that another module (e.g. the filesystem's
`llmfs bench fs`) registers beside `codec` by calling it too, in any order.

Threading: single-threaded driver; torch intra-op threads as given by --threads.
"""
from __future__ import annotations

import lzma
import sys
import time

import zstandard

from .container import header_size

# int8 GEMM shape for the peak: SmolLM2's 576 → 1536 MLP projection with 1024 activation rows.
PEAK_SHAPE = (1024, 576, 1536)


def bench_subparsers(subparsers):
    """The sub-subparsers of `llmfs bench` (created on first use)."""
    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="measure compression and speed")
        bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
        bench._llmfs_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    return bench._llmfs_sub


def register(subparsers) -> None:
    p = bench_subparsers(subparsers).add_parser(
        "codec", help="LM codec vs xz/zstd/brotli and the float floor, with speeds")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-m", "--model", default=None, help="model spec (default: the default model)")
    p.add_argument("--segment", type=int, default=None,
                   help="tokens per segment incl. BOS (default: the codec's)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="use only the first N bytes of each file (the model is slow on CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--no-floor", action="store_true", help="skip the float32 reference")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of bits per byte")
    p.set_defaults(func=run_codec)


def int8_peak_ops(device: str = "cpu", seconds: float = 1.0) -> float:
    """int8×int8→int32 GEMM throughput (ops/s, 2 per multiply-add) of torch._int_mm, warm."""
    import torch
    m, k, n = PEAK_SHAPE
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=device)
    for _ in range(3):
        torch._int_mm(a, b)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            torch._int_mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 5 * 2 * m * k * n / (time.perf_counter() - t))
    return best


def ops_per_token(engine, segment_tokens: int) -> float:
    c = getattr(engine, "config", None)
    if c is None:
        return float("nan")
    layer = (c.dim * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_head * c.head_dim * c.dim
             + 3 * c.dim * c.ffn_dim)
    gemm = 2 * (c.n_layer * layer + c.dim * c.vocab_size)
    attention = 4 * c.n_layer * c.n_head * c.head_dim * (segment_tokens + 1) / 2
    return gemm + attention


def baselines(data: bytes) -> dict[str, int]:
    import brotli
    return {
        "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
        "zstd -19": len(zstandard.ZstdCompressor(level=19).compress(data)),
        "brotli -11": len(brotli.compress(data, quality=11)),
    }


def run_codec(args) -> int:
    import torch

    from .lm import PAYLOAD_VERSION, SEGMENT_TOKENS, open_codec
    codec = open_codec(args.model, batch=args.batch, threads=args.threads, device=args.device,
                       segment_tokens=args.segment or SEGMENT_TOKENS)
    device = str(codec.engine.device)
    print(f"model {args.model or 'default'}  segment {codec.segment_tokens} tokens  batch "
          f"{codec.batch}  threads {torch.get_num_threads()}  device {device}")
    peak = int8_peak_ops(device)
    opt = ops_per_token(codec.engine, codec.segment_tokens)
    print(f"int8 GEMM peak (torch._int_mm {PEAK_SHAPE[0]}x{PEAK_SHAPE[1]}x{PEAK_SHAPE[2]}): "
          f"{peak / 1e12:.2f} TOP/s;  ops/token = 2*(layer+head params) + 4*L*H*hs*(S+1)/2 "
          f"= {opt / 1e6:.0f} MOP")
    cols = ["raw", "xz -9e", "zstd -19", "brotli -11", "bare", "lm", "bare bpb", "lm bpb",
            "float bpb", "bare/float", "lm/float", "lm/xz", "enc tok/s", "dec tok/s", "enc/bare",
            "dec/bare", "enc %pk", "dec %pk"]
    print("  ".join(f"{c:>10}" for c in cols) + "  file")
    rows = []
    for path in args.files:
        with open(path, "rb") as f:
            data = f.read(args.max_bytes) if args.max_bytes else f.read()
        base = baselines(data)
        segments = codec.segments(data)
        ntok = sum(len(s) for s in segments)
        timed = {}
        for version in (2, PAYLOAD_VERSION):         # the bare model, then the full codec
            codec.version = version
            t = time.perf_counter()
            payload = codec.encode_payload(data)
            enc = time.perf_counter() - t
            t = time.perf_counter()
            (back,) = codec.decode_many([(payload, len(data))])
            timed[version] = (len(payload), enc, time.perf_counter() - t)
            if back != data:
                print(f"llmfs bench: error: {path}: LM round trip (payload version {version}) "
                      f"FAILED", file=sys.stderr)
                return 1
        head = header_size(len(data), has_fingerprint=True)
        bare, bare_enc_s, bare_dec_s = timed[2]
        lm, enc_s, dec_s = timed[PAYLOAD_VERSION]
        bare, lm = bare + head, lm + head                # the whole containers
        n = max(1, len(data))
        floor = float("nan")
        if not args.no_floor and args.model not in ("tiny",) and not str(args.model).startswith(
                "tiny:"):
            from .lm import reference
            floor = reference.cross_entropy_bits(
                args.model, [[codec.engine.bos_id] + s for s in segments]) / n
        enc_tps, dec_tps = ntok / max(enc_s, 1e-9), ntok / max(dec_s, 1e-9)
        row = {"file": path, "raw": len(data), **base, "bare": bare, "lm": lm,
               "bare bpb": 8 * bare / n, "lm bpb": 8 * lm / n, "float bpb": floor,
               "bare/float": 8 * bare / n / floor, "lm/float": 8 * lm / n / floor,
               "lm/xz": lm / max(1, base["xz -9e"]),
               "enc tok/s": enc_tps, "dec tok/s": dec_tps,
               "enc/bare": bare_enc_s / max(enc_s, 1e-9), "dec/bare": bare_dec_s / max(dec_s, 1e-9),
               "enc %pk": 100 * enc_tps * opt / peak, "dec %pk": 100 * dec_tps * opt / peak}
        rows.append(row)
        print("  ".join(_fmt(row[c]) for c in cols) + f"  {path}", flush=True)
    if len(rows) > 1:
        def mean(c: str) -> float:
            return sum(r[c] for r in rows) / len(rows)
        print(f"mean over {len(rows)} files: bare/float {mean('bare/float'):.4f}  lm/float "
              f"{mean('lm/float'):.4f}  lm/bare {sum(r['lm'] / r['bare'] for r in rows) / len(rows):.4f}"
              f"  enc/bare {mean('enc/bare'):.3f}  dec/bare {mean('dec/bare'):.3f}")
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _fmt(v) -> str:
    if isinstance(v, int):
        return f"{v:>10d}"
    return f"{v:>10.3f}" if abs(v) < 100 else f"{v:>10.1f}"


def _plot(rows: list[dict], out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("llmfs bench: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return
    names = ["xz -9e", "zstd -19", "bare", "lm", "float"]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(rows)), 4))
    width = 0.8 / len(names)
    labels = {"bare": "bare model", "lm": "full codec", "float": "float32 floor (bare)"}
    for j, name in enumerate(names):
        vals = [r["float bpb"] if name == "float" else 8 * r[name] / max(1, r["raw"])
                for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=labels.get(name, name))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["file"].rsplit("/", 1)[-1] for r in rows], rotation=15)
    ax.set_ylabel("bits per byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


__all__ = ["register", "bench_subparsers", "run_codec", "int8_peak_ops", "ops_per_token"]
