"""The exact integer GEMM backends of the engine on CPU, and the choice among them.

Every linear layer multiplies int8 activations by int8 weights into int32. Any form that computes
the same integers may do it, and which is fastest depends on the CPU:

  vnni   kernels.c gemm_packed on AVX-512 VNNI (vpdpbusd) on pack_weight's layout;
  avx2   kernels.c gemm_packed on AVX2 (vpmaddwd on int16-widened bytes: exact; vpmaddubsw would
         saturate), the same packed weights; an int16 input's stacked hi/lo int8 rows in one pass
         on the rebuilt int16 rows (gemm_packed16: half the work of two int8 passes);
  blas   float32 GEMM (MKL/oneDNN through torch) on the integer values, K cut into chunks of at most
         F32_CHUNK = 1024: every product is at most 128 * 127 < 2^14 in magnitude, so every partial
         sum any BLAS forms, in any order, with or without FMA, is an integer of magnitude <= 2^24
         and exact in float32; each chunk's result converts to int32 exactly and the chunks add in
         int32 (|total| <= 128 * 127 * K < 2^31). The int16 inputs of qkv, down and the LM head
         reach the GEMM as two int8 rows (hi and lo, engine.TorchOps.quant_rows), so this bound
         covers them too; the float32 weights cost 4 bytes per weight (built on first use);
  intmm  torch._int_mm (oneDNN): fast where it has VNNI/AMX, 1.7-1.9 GOP/s on an AVX2-only AMD EPYC;
         without VNNI/AMX oneDNN's vpmaddubsw saturates and the integers are wrong, so a probe at
         the int8 extremes (_intmm_inexact) rules it out there.

They give the same int32 results (tests/test_backends.py checks each, at the int8 extremes and on the
real model's weights), so the choice never changes a frequency table, only the speed. It is made per
regime — few rows (decoding: at most engine.PACKED_ROWS) and many rows (encoding) — by a short
measurement at first use on the model's 576 x 1536 shape (int8 rows, and for avx2 also its one-pass
int16 rows, weighed by the model's share of int16 inputs: _model_rate), cached in the kernels cache directory per
CPU model and kernels build, and logged on the "llmfs" logger at INFO.

LLMFS_BACKEND=vnni|avx2|blas|intmm forces one form for every regime (a CPU that cannot run it is an
error, BackendError). avx2, blas and intmm also load kernels.c built without any AVX-512 code, so an
AVX-512 machine runs the elementwise kernels an AVX2-only CPU runs; vnni (and auto on a VNNI CPU)
load the full build.

Attention when encoding (many queries per row): kernels.c attend_fwd, scores, weights and P.V fused
per tile of query rows on the int16 integers: its VNNI tile where the backend loads the full build
on a VNNI CPU, else its AVX2 tile (vpmaddwd + vpaddd, the same int32 sums), every backend alike, on
the engine's threads. Only a CPU without AVX2 falls back to kernels.c attend_step once per query on
the segment's int16 keys, or for intmm to the int8 digit GEMMs of the operands by torch._int_mm.
When decoding, kernels.c attend_step: its VNNI form, else its AVX2 form (the heads of a KV group
share the passes over keys and values), else its portable loops.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import kernels

log = logging.getLogger("llmfs")

ENV = "LLMFS_BACKEND"
FORMS = ("vnni", "avx2", "blas", "intmm")
# gemm_packed's impl numbers
_IMPL = {"vnni": 2, "avx2": 3}
# K per float32 chunk: 1024 products of magnitude < 2^14 sum to at most 2^24 (exact in float32)
F32_CHUNK = 1024
# The measured shape: SmolLM2's gate_up (K 576 -> N 1536) at decoding's and encoding's row counts
_SHAPE_K, _SHAPE_N = 576, 1536
_ROWS = {"few": 64, "many": 1024}
# Share of a token's GEMM multiply-adds whose input is int16 (qkv, down, the LM head: the engine
# passes them as stacked hi/lo int8 rows) in SmolLM2-135M: per layer qkv 576x960 + down 1536x576
# of 576x960 + o 576x576 + gate_up 576x3072 + down, times 30 layers, plus the head 576x49152:
# 71.4 of 134.4 M. Every form but avx2 multiplies those rows twice (hi and lo); avx2 once
# (gemm_packed16). The choice compares forms on this mix (_model_rate), not on int8 alone.
_INT16_SHARE = 0.53
# The rule the choice follows: part of the cached choice's name, so a choice made by an older rule
# is measured again (2: weighed by _model_rate).
_CHOICE_RULE = 2


class BackendError(RuntimeError):
    """A forced backend that this CPU or build cannot run."""


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def cpu_model() -> str:
    """The CPU's name with family/model/stepping (the cache key of the measured choice)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    get = lambda k: (re.search(rf"^{k}\s*:\s*(.*)$", text, re.M) or [None, "?"])[1].strip()
    return f"{get('model name')} (family {get('cpu family')} model {get('model')} stepping {get('stepping')})"


def has_vnni() -> bool:
    f = cpu_flags()
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= f


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) weight -> kernels.c gemm_packed's layout: unsigned bytes w + 128 in panels of
    16 output channels, (N/16, K/4, 16, 4). N % 16 == 0 and K % 4 == 0."""
    N, K = w.shape
    u = (w.to(torch.int16) + 128).to(torch.uint8)  # 0..255: exact
    return u.view(N // 16, 16, K // 4, 4).transpose(1, 2).contiguous()


def f32_weight(w: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> float32 (K, N) contiguous (the right operand as BLAS reads it fastest)."""
    return w.t().to(torch.float32).contiguous()


def mm_f32(q: torch.Tensor, wf: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ float32 (K, N) holding int8 values -> int32 (M, N), exact (F32_CHUNK). Only
    at float32 matmul precision "highest": "high"/"medium" let oneDNN multiply in TF32/bfloat16,
    which drop bits of the int8 operands; then the chunks run in float64 (exact as well)."""
    K = q.shape[1]
    if torch.get_float32_matmul_precision() != "highest":
        wf = wf.to(torch.float64)
    qf = q.to(wf.dtype)
    out = None
    for k0 in range(0, K, F32_CHUNK):
        part = (qf[:, k0 : k0 + F32_CHUNK] @ wf[k0 : k0 + F32_CHUNK]).to(torch.int32)  # exact ints
        out = part if out is None else out.add_(part)
    return out if out is not None else torch.zeros(q.shape[0], wf.shape[1], dtype=torch.int32)


def mm_intmm(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (N, K).T -> int32 (M, N) by torch._int_mm. CUDA's wants M > 16: pad."""
    m = q.shape[0]
    if q.is_cuda and m <= 16:
        q = torch.cat([q, q.new_zeros(17 - m, q.shape[1])])
    return torch._int_mm(q, w.t())[:m]


def gemm_packed(
    lib, form: str, q: torch.Tensor, wp: torch.Tensor, N: int, threads: int = 1
) -> torch.Tensor | None:
    """kernels.c gemm_packed of int8 q (M, K) with packed wp -> int32 (M, N), or None if it could
    not run."""
    assert q.dtype == torch.int8 and q.is_contiguous() and q.device.type == "cpu"
    out = torch.empty(q.shape[0], N, dtype=torch.int32)
    ran = lib.gemm_packed(
        q.data_ptr(), q.shape[0], q.shape[1], wp.data_ptr(), N, out.data_ptr(), _IMPL[form], threads
    )
    return out if ran == _IMPL[form] else None


def gemm_packed16(lib, q: torch.Tensor, wp: torch.Tensor, N: int, threads: int = 1) -> torch.Tensor | None:
    """kernels.c gemm_packed16: the stacked hi/lo int8 rows q (2M, K) of an int16 input (xq = 128 hi
    + lo) with packed wp -> int32 (2M, N) stacked accumulators of the same values as
    gemm_packed's (128 hi + lo), in one AVX2 pass on the int16 rows instead of two int8 ones; None
    if it could not run."""
    assert q.dtype == torch.int8 and q.is_contiguous() and q.device.type == "cpu" and q.shape[0] % 2 == 0
    out = torch.empty(q.shape[0], N, dtype=torch.int32)
    ran = lib.gemm_packed16(
        q.data_ptr(), q.shape[0] // 2, q.shape[1], wp.data_ptr(), N, out.data_ptr(), threads
    )
    return out if ran == _IMPL["avx2"] else None


@dataclass
class Backend:
    """What the engine runs on CPU: the GEMM form per regime, the kernels build, and why."""

    name: str  # a forced form, or "auto"
    few: str  # GEMM form for at most PACKED_ROWS rows
    many: str  # GEMM form for more rows
    variant: str  # kernels build: "full" or "noavx512"
    reason: str
    timings: dict = field(default_factory=dict)  # form -> {"few": GOP/s, "many": GOP/s}

    @property
    def lib(self) -> ctypes.CDLL | None:
        return kernels.lib(self.variant)

    @property
    def attention(self) -> str:
        """The encoding attention: "vnni" or "avx2" (kernels.c attend_fwd's fused tile: VNNI where
        the build and CPU have it, else AVX2), "digits" (int8 digit GEMMs by torch._int_mm) or
        "steps" (kernels.c attend_step per query), the last two only for CPUs without AVX2."""
        if self.variant == "full" and has_vnni():
            return "vnni"
        if "avx2" in cpu_flags():
            return "avx2"
        return "digits" if self.many == "intmm" else "steps"  # intmm: only where it is exact

    def digits_mm(self):
        """FusedOps' digits_mm: the GEMM of the digit form (vnni's fallback and intmm's)."""
        return mm_intmm

    def describe(self) -> str:
        t = ", ".join(
            f"{f} {v['few']:.0f}/{v['many']:.0f}"
            + (
                f" (int16 rows in one pass {v['int16 few']:.0f}/{v['int16 many']:.0f})"
                if "int16 few" in v
                else ""
            )
            for f, v in self.timings.items()
        )
        return (
            f"backend {self.name}: GEMM few rows {self.few}, many rows {self.many}, "
            f"attention {self.attention}, kernels {self.variant} ({self.reason}"
            + (f"; measured GOP/s few/many rows: {t}" if t else "")
            + ")"
        )


@functools.cache
def _intmm_inexact() -> bool:
    """Whether torch._int_mm gives wrong integers here. oneDNN's int8 GEMM without VNNI/AMX (an
    AVX2-only CPU, or ONEDNN_MAX_CPU_ISA=AVX2) multiplies with vpmaddubsw, whose int16 pair sums
    saturate: with rows of +-127 against weights of +-127 it returned other integers (measured on
    this Sapphire Rapids limited to AVX2, at 2-1024 rows, K 576 and 1536). Probed at the int8
    extremes on two row counts, once per process."""
    g = torch.Generator().manual_seed(0)
    for m in (2, 64):
        a = torch.randint(-128, 128, (m, 576), dtype=torch.int8, generator=g)
        w = torch.randint(-128, 128, (32, 576), dtype=torch.int8, generator=g)
        a[0], a[1], w[0], w[1] = 127, -128, 127, -128
        if not torch.equal(mm_intmm(a, w).to(torch.int64), a.to(torch.int64) @ w.to(torch.int64).t()):
            return True
    return False


def unsupported(form: str) -> str | None:
    """Why this CPU/build cannot run `form` (None: it can)."""
    if form not in FORMS:
        return f"unknown backend {form!r} (one of {', '.join(FORMS)})"
    if form == "intmm" and _intmm_inexact():
        return f"torch._int_mm is not exact on this CPU or oneDNN ISA (int16 saturation; {cpu_model()})"
    if form in _IMPL:
        lib = kernels.lib("full")  # holds both packed forms
        if lib is None:
            return "the C kernels cannot be built here (no C compiler)"
        if lib.gemm_packed(None, 0, 4, None, 16, None, _IMPL[form], 1) != _IMPL[form]:
            need = "AVX-512 VNNI" if form == "vnni" else "AVX2"
            return f"this CPU has no {need} ({cpu_model()})"
    return None


def _measure(form: str, rows: int, seconds: float = 0.08) -> float:
    """GOP/s of one GEMM form on the measured shape, best of a few runs (1 thread). Few rows cycle
    through 8 weights (7 MB as int8) as decoding does through its layers': with one weight hot in
    L2 the forms rank differently than when the weights come from memory."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (rows, _SHAPE_K), dtype=torch.int8, generator=g)
    ws = [
        torch.randint(-127, 128, (_SHAPE_N, _SHAPE_K), dtype=torch.int8, generator=g)
        for _ in range(8 if rows <= 256 else 1)
    ]
    if form == "avx2-int16":  # the stacked hi/lo rows of `rows` int16 inputs, in one pass
        hi = torch.randint(-127, 128, (rows, _SHAPE_K), dtype=torch.int8, generator=g)
        lo = torch.randint(-64, 65, (rows, _SHAPE_K), dtype=torch.int8, generator=g)
        a = torch.cat([hi, lo]).contiguous()
        lib, wps = kernels.lib("full"), [pack_weight(w) for w in ws]
        if gemm_packed16(lib, a, wps[0], _SHAPE_N) is None:
            return 0.0
        one = lambda i: gemm_packed16(lib, a, wps[i], _SHAPE_N)
    elif form in _IMPL:
        lib, wps = kernels.lib("full"), [pack_weight(w) for w in ws]
        one = lambda i: gemm_packed(lib, form, a, wps[i], _SHAPE_N)
    elif form == "blas":
        wfs = [f32_weight(w) for w in ws]
        one = lambda i: mm_f32(a, wfs[i])
    else:
        one = lambda i: mm_intmm(a, ws[i])
    run = lambda: [one(i) for i in range(len(ws))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return 2 * rows * _SHAPE_K * _SHAPE_N * len(ws) / best_time(run, seconds) / 1e9
    finally:
        torch.set_num_threads(threads)


def _model_rate(form: str, timings: dict, regime: str) -> float:
    """Useful GOP/s of `form` on the model's mix of int8 and int16 inputs (_INT16_SHARE): an int16
    input costs two int8 passes, except on avx2, whose one pass on the rebuilt rows was measured
    ("int16", in int16 GOP/s: each stacked pair of rows counted once)."""
    r8 = timings[form][regime]
    r16 = timings[form].get(f"int16 {regime}") or r8 / 2
    if r8 <= 0 or r16 <= 0:
        return 0.0
    return 1.0 / ((1 - _INT16_SHARE) / r8 + _INT16_SHARE / r16)


def best_time(run, seconds: float) -> float:
    """The shortest CPU time of this thread for run() over about `seconds` of it (after one warm-up
    call). CPU time, not wall time: on a shared machine the wall clock also counts the time other
    processes held the core, and the choice (and the peaks of "% of peak") would follow the load."""
    run()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t = time.thread_time()
        run()
        d = time.thread_time() - t
        spent += d
        best = min(best, d) if d > 0 else best
    return best


def _choice_path(build_key: str) -> Path:
    key = re.sub(r"[^A-Za-z0-9]+", "-", cpu_model()).strip("-")
    return kernels.cache_dir() / f"backend-{key}-{build_key}-r{_CHOICE_RULE}.json"


def _choose() -> Backend:
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced != "auto":
        why = unsupported(forced)
        if why is not None:
            raise BackendError(f"{ENV}={forced}: {why}")
        return Backend(forced, forced, forced, "full" if forced == "vnni" else "noavx512", f"forced by {ENV}")
    full = kernels.lib("full")
    key = kernels.build_key(full._llmfs_path) if full is not None else "nokernels"
    path = _choice_path(key)
    runnable = [f for f in FORMS if unsupported(f) is None]
    try:
        c = json.loads(path.read_text())
        if c["few"] in runnable and c["many"] in runnable:
            return Backend(
                "auto",
                c["few"],
                c["many"],
                c["variant"],
                f"measured on this CPU model earlier, {path.name}",
                c["timings"],
            )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    timings = {f: {r: _measure(f, n) for r, n in _ROWS.items()} for f in runnable}
    if "avx2" in runnable:
        timings["avx2"].update({f"int16 {r}": _measure("avx2-int16", n) for r, n in _ROWS.items()})
    few = max(runnable, key=lambda f: _model_rate(f, timings, "few"))
    many = max(runnable, key=lambda f: _model_rate(f, timings, "many"))
    variant = "full"  # the build with every form this CPU has
    b = Backend("auto", few, many, variant, "measured at first use", timings)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"cpu": cpu_model(), "few": few, "many": many, "variant": variant, "timings": timings})
        )
        os.replace(tmp, path)
    except OSError:
        pass
    return b


_lock = threading.Lock()
_current: Backend | None = None


def current() -> Backend:
    """The backend of this process (chosen once; LLMFS_BACKEND forces one)."""
    global _current
    with _lock:
        if _current is None:
            _current = _choose()
            # INFO when measured now or forced; a choice read from the cache at DEBUG, so that
            # `llmfs compress` stays quiet (the daemon logs the engine's backend when it loads
            # a model: llmfs/models.py)
            cached = _current.reason.startswith("measured on this CPU model earlier")
            log.log(
                logging.DEBUG if cached else logging.INFO,
                "exact engine on %s: %s",
                cpu_model(),
                _current.describe(),
            )
        return _current


def select(name: str | None) -> Backend:
    """A backend by name ("auto" or None: the measured choice), for tests and benchmarks; raises
    BackendError when the CPU cannot run it. Does not change current()."""
    if name in (None, "auto"):
        return current()
    why = unsupported(name)
    if why is not None:
        raise BackendError(f"backend {name}: {why}")
    return Backend(name, name, name, "full" if name == "vnni" else "noavx512", "selected")


__all__ = [
    "Backend",
    "BackendError",
    "ENV",
    "FORMS",
    "F32_CHUNK",
    "current",
    "select",
    "unsupported",
    "pack_weight",
    "f32_weight",
    "mm_f32",
    "mm_intmm",
    "gemm_packed",
    "gemm_packed16",
    "cpu_model",
    "has_vnni",
    "best_time",
]
