"""`llmfs bench codec FILE...`: the LM codec against xz / zstd / brotli and its own float floor.

Everything in one report is measured in one run on the same bytes: raw size, xz -9e, zstd -19,
brotli -11, the LM container of the bare model ("bare": payload version 2, the engine's rows as
they are), of the rows mixed with the online side models of codec/lm/mixer.py ("mix": version 3)
and of the full codec ("lm": PAYLOAD_VERSION, today 6: its mixer, each group also coded bare and
the smaller kept, and the codec's dictionary, codec/lm/dictionary.py:
the built-in default unless --dictionary names a file whose start is sampled as `llmfs tune`
would), all in bytes and bits per byte, the full codec's container as a store keeps it ("store":
the compact form of codec/container.py, whose 4-byte header replaces the 24-byte one of a
standalone container, the store's block key the check, and a dictionary's 8-byte id a one-byte
store-local number), the float32 model's cross-entropy on the very
segments the codec codes (codec/lm/reference.py — the bare model's floor, which the exact engine
should stay within ~1 % of and the full codec should go below), the full codec's encode and decode
speed in tokens/s, those speeds against the bare model's measured in the same run ("enc/bare"), and
as a fraction of this machine's peaks, also measured in this run.

"% of peak" (one definition, here; bench/engine_bench.py uses it too): tokens/s x ops per token
against the peak of the GEMM backend that ran, times the cores the run used.
  * ops per token = 2 x (linear-layer parameters + LM-head parameters), ~270 MOP for SmolLM2-135M:
    the roofline's count. Attention's context-dependent work (4 x n_layer x n_head x head_dim x mean
    context: ~57 MOP at 1024 tokens) is not counted, nor the second int8 pass of the int16-input
    layers (qkv, down, head: ~1.5x the counted ops run): both are the engine's cost.
  * the backend's peak: the best throughput of the backend's exact GEMM forms (codec/lm/backend.py:
    the few-rows and the many-rows form) on PEAK_SHAPE, one core, by the thread's CPU time (on a
    shared machine wall time would also count the other processes' turns);
  * the float32 GEMM peak: torch float32 on the same shape, one core, said beside it in the same
    run (the roofline an AVX2 CPU's exact engine is held against);
  * with N cores: against N x the one-core peak (run --threads 1 and --threads N for both).

Structure: `llmfs bench` has its own subcommands. `bench_subparsers(subparsers)` returns them,
creating the `bench` parser the first time, so that another module (e.g. the filesystem's
`llmfs bench fs`) registers beside `codec` by calling it too, in any order.

Threading: single-threaded driver; --threads N gives the engine N threads (codec/lm/codec.py).
"""

from __future__ import annotations

import lzma
import sys
import time
from dataclasses import dataclass

import zstandard

from .container import compact_size, header_size

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
        "codec", help="LM codec vs xz/zstd/brotli and the float floor, with speeds"
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-m", "--model", default=None, help="model spec (default: the default model)")
    p.add_argument(
        "--segment", type=int, default=None, help="tokens per segment incl. BOS (default: the codec's)"
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="use only the first N bytes of each file (the model is slow on CPU)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--no-floor", action="store_true", help="skip the float32 reference")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of bits per byte")
    p.add_argument(
        "--dictionary",
        nargs="+",
        metavar="SAMPLE",
        help="files to choose the dictionary from (as llmfs tune does; default: the built-in one)",
    )
    p.set_defaults(func=run_codec)


def int8_peak_ops(device: str = "cpu", seconds: float = 1.0) -> float:
    """int8×int8→int32 GEMM throughput (ops/s, 2 per multiply-add) of torch._int_mm, warm."""
    import torch

    m, k, n = PEAK_SHAPE
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=device)
    return 2 * m * k * n / _best(lambda: torch._int_mm(a, b), device, seconds)


def f32_peak_flops(device: str = "cpu", seconds: float = 0.5) -> float:
    """float32 GEMM throughput (FLOP/s) of torch on PEAK_SHAPE, one thread on CPU."""
    import torch

    m, k, n = PEAK_SHAPE
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    return 2 * m * k * n / _best(lambda: a @ b, device, seconds)


def _best(run, device: str, seconds: float) -> float:
    """Shortest time of run(): on CPU at one torch thread by the thread's CPU time
    (codec/lm/backend.best_time), on CUDA by wall time after synchronising."""
    import torch

    if device == "cpu":
        from .lm.backend import best_time

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return best_time(run, seconds)
        finally:
            torch.set_num_threads(threads)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


@dataclass
class Peaks:
    """The peaks "% of peak" divides by (module docstring), measured in this run."""

    backend: str  # what ran: the backend's description, or the device
    ops: float  # ops/s, one core: the backend's best exact GEMM form on PEAK_SHAPE
    f32: float  # FLOP/s, one core: float32 GEMM on PEAK_SHAPE
    cores: int  # cores the measured run uses

    def pct(self, tokens_per_s: float, ops_per_token: float) -> float:
        return 100 * tokens_per_s * ops_per_token / (self.ops * self.cores)

    def pct_f32(self, tokens_per_s: float, ops_per_token: float) -> float:
        return 100 * tokens_per_s * ops_per_token / (self.f32 * self.cores)

    def describe(self, ops_per_token: float) -> str:
        m, k, n = PEAK_SHAPE
        return (
            f"{self.backend}\n"
            f"peaks ({m}x{k}x{n}, one core): exact int GEMM {self.ops / 1e9:.0f} GOP/s, "
            f"float32 GEMM {self.f32 / 1e9:.0f} GFLOP/s; cores used {self.cores} "
            f"(%: against {self.cores} x the one-core peak); ops/token = 2 x (linear-layer + "
            f"head params) = {ops_per_token / 1e6:.0f} MOP -> roofline "
            f"{self.ops * self.cores / ops_per_token:.0f} tokens/s (int), "
            f"{self.f32 * self.cores / ops_per_token:.0f} (float32)"
        )


def measure_peaks(engine, cores: int = 1, seconds: float = 0.5) -> Peaks:
    """The peaks of `engine`'s backend (CPU: its GEMM forms; CUDA: torch._int_mm) and float32."""
    import torch

    device = str(getattr(engine, "device", "cpu"))
    b = getattr(engine, "backend", None)
    f32 = f32_peak_flops("cuda" if device.startswith("cuda") else "cpu", seconds)
    if device.startswith("cuda") or b is None:
        return Peaks(f"device {device}: torch._int_mm", int8_peak_ops(device, seconds), f32, cores)
    from .lm import backend as backends

    m, k, n = PEAK_SHAPE
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    best = 0.0
    for form in {b.few, b.many}:
        if form in ("vnni", "avx2"):
            wp = backends.pack_weight(w)
            run = lambda form=form, wp=wp: backends.gemm_packed(b.lib, form, a, wp, n)
        elif form == "blas":
            wf = backends.f32_weight(w)
            run = lambda wf=wf: backends.mm_f32(a, wf)
        else:
            run = lambda: backends.mm_intmm(a, w)
        best = max(best, 2 * m * k * n / _best(run, "cpu", seconds))
    return Peaks(f"{b.describe()}; CPU {backends.cpu_model()}", best, f32, cores)


def ops_per_token(engine, segment_tokens: int | None = None) -> float:
    """The roofline's ops per token (module docstring): 2 x (linear-layer + head parameters).
    segment_tokens is accepted for callers of the older form that added attention; unused."""
    c = getattr(engine, "config", engine)
    if not hasattr(c, "n_layer"):
        return float("nan")
    layer = (
        c.dim * (c.n_head + 2 * c.n_kv_head) * c.head_dim
        + c.n_head * c.head_dim * c.dim
        + 3 * c.dim * c.ffn_dim
    )
    return 2 * (c.n_layer * layer + c.dim * c.vocab_size)


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
    from .lm.codec import payload_dictionary

    for path in args.files:  # before the model loads: a wrong name fails at once, in words
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            print(f"llmfs bench codec: cannot read {path}: {e.strerror or e}", file=sys.stderr)
            return 2
    codec = open_codec(
        args.model,
        batch=args.batch,
        threads=args.threads,
        device=args.device,
        segment_tokens=args.segment or SEGMENT_TOKENS,
    )
    if args.dictionary:
        from .lm import dictionary

        samples = []
        for path in args.dictionary:
            with open(path, "rb") as f:
                samples.append(f.read(dictionary.SAMPLE_BYTES))
        codec.use_dictionary(dictionary.choose(samples, codec.tokenizer, codec.engine.max_seq_len))
    d = codec.dictionary
    print(f"dictionary {d.id.hex()} ({len(d.tokens)} tokens)" if d else "no dictionary")
    device = str(codec.engine.device)
    cores = getattr(codec.engine, "threads", None) or torch.get_num_threads()
    print(
        f"model {args.model or 'default'}  segment {codec.segment_tokens} tokens  batch "
        f"{codec.batch}  threads {cores}  device {device}"
    )
    opt = ops_per_token(codec.engine)
    peaks = measure_peaks(codec.engine, cores)
    print(peaks.describe(opt))
    cols = [
        "raw",
        "xz -9e",
        "zstd -19",
        "brotli -11",
        "bare",
        "mix",
        "lm",
        "store",
        "bare bpb",
        "mix bpb",
        "lm bpb",
        "store bpb",
        "float bpb",
        "bare/float",
        "mix/float",
        "lm/float",
        "store/float",
        "lm/xz",
        "enc tok/s",
        "dec tok/s",
        "enc/bare",
        "dec/bare",
        "enc %pk",
        "dec %pk",
        "enc %f32",
        "dec %f32",
    ]
    print("  ".join(f"{c:>10}" for c in cols) + "  file")
    rows = []
    for path in args.files:
        with open(path, "rb") as f:
            data = f.read(args.max_bytes) if args.max_bytes else f.read()
        base = baselines(data)
        segments = codec.segments(data)
        ntok = sum(len(s) for s in segments)
        timed = {}
        for version in (2, 3, PAYLOAD_VERSION):  # the bare model, the mixer, the full codec
            codec.version = version
            t, c = time.perf_counter(), time.process_time()
            payload = codec.encode_payload(data)
            enc, enc_cpu = time.perf_counter() - t, time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            (back,) = codec.decode_many([(payload, len(data))])
            dec, dec_cpu = time.perf_counter() - t, time.process_time() - c
            timed[version] = (len(payload), enc, dec, enc_cpu, dec_cpu)
            if version == PAYLOAD_VERSION:  # a store keeps a dictionary id as its number
                numbered = 0 if payload_dictionary(payload) is not None else None
            if back != data:
                print(
                    f"llmfs bench: error: {path}: LM round trip (payload version {version}) FAILED",
                    file=sys.stderr,
                )
                return 1
        head = header_size(len(data), has_fingerprint=True)
        bare, bare_enc_s, bare_dec_s, _, _ = timed[2]
        lm, enc_s, dec_s, enc_cpu, dec_cpu = timed[PAYLOAD_VERSION]
        mix = timed[3][0] + head
        store = lm + compact_size(len(data), 0, numbered)  # the full codec's container as a store keeps it
        bare, lm = bare + head, lm + head  # the whole containers
        n = max(1, len(data))
        floor = float("nan")
        if not args.no_floor and args.model not in ("tiny",) and not str(args.model).startswith("tiny:"):
            from .lm import reference

            floor = (
                reference.cross_entropy_bits(args.model, [[codec.engine.bos_id] + s for s in segments]) / n
            )
        enc_tps, dec_tps = ntok / max(enc_s, 1e-9), ntok / max(dec_s, 1e-9)
        row = {
            "file": path,
            "raw": len(data),
            **base,
            "bare": bare,
            "lm": lm,
            "mix": mix,
            "store": store,
            "bare bpb": 8 * bare / n,
            "store bpb": 8 * store / n,
            "mix bpb": 8 * mix / n,
            "lm bpb": 8 * lm / n,
            "float bpb": floor,
            "bare/float": 8 * bare / n / floor,
            "lm/float": 8 * lm / n / floor,
            "mix/float": 8 * mix / n / floor,
            "store/float": 8 * store / n / floor,
            "lm/xz": lm / max(1, base["xz -9e"]),
            "enc tok/s": enc_tps,
            "dec tok/s": dec_tps,
            "enc/bare": bare_enc_s / max(enc_s, 1e-9),
            "dec/bare": bare_dec_s / max(dec_s, 1e-9),
            "enc %pk": peaks.pct(enc_tps, opt),
            "dec %pk": peaks.pct(dec_tps, opt),
            "enc %f32": peaks.pct_f32(enc_tps, opt),
            "dec %f32": peaks.pct_f32(dec_tps, opt),
        }
        rows.append(row)
        print("  ".join(_fmt(row[c]) for c in cols) + f"  {path}", flush=True)
        if device == "cpu":
            # the same per second of this process's CPU time (all its threads): what the machine
            # gives when others share it, against one core's peak (the peaks are CPU-time too)
            one = Peaks(peaks.backend, peaks.ops, peaks.f32, 1)
            e, d = ntok / max(enc_cpu, 1e-9), ntok / max(dec_cpu, 1e-9)
            print(
                f"{'':>10}  per CPU-second: encode {e:.1f} tokens = {one.pct(e, opt):.1f} % "
                f"of the backend's peak, {one.pct_f32(e, opt):.1f} % of float32's; decode "
                f"{d:.1f} = {one.pct(d, opt):.1f} %, {one.pct_f32(d, opt):.1f} %",
                flush=True,
            )
    if len(rows) > 1:

        def mean(c: str) -> float:
            return sum(r[c] for r in rows) / len(rows)

        print(
            f"mean over {len(rows)} files: bare/float {mean('bare/float'):.4f}  mix/float "
            f"{mean('mix/float'):.4f}  lm/float "
            f"{mean('lm/float'):.4f}  store/float {mean('store/float'):.4f}  lm/bare {sum(r['lm'] / r['bare'] for r in rows) / len(rows):.4f}"
            f"  enc/bare {mean('enc/bare'):.3f}  dec/bare {mean('dec/bare'):.3f}"
        )
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
    names = [
        "xz -9e",
        "zstd -19",
        "bare",
        "lm",
        *(["store"] if all("store" in r for r in rows) else []),
        "float",
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(rows)) + 2.5, 4))
    width = 0.8 / len(names)
    labels = {
        "bare": "bare model",
        "lm": "full codec",
        "store": "full codec, as a store keeps it",
        "float": "float32 floor (bare)",
    }
    for j, name in enumerate(names):
        vals = [r["float bpb"] if name == "float" else 8 * r[name] / max(1, r["raw"]) for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=labels.get(name, name))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["file"].rsplit("/", 1)[-1] for r in rows], rotation=15)
    ax.set_ylabel("bits per byte")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # beside the bars
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


__all__ = [
    "register",
    "bench_subparsers",
    "run_codec",
    "int8_peak_ops",
    "f32_peak_flops",
    "Peaks",
    "measure_peaks",
    "ops_per_token",
    "PEAK_SHAPE",
]
