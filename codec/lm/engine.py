"""The exact inference engine: a Llama-family transformer whose output — an integer frequency table per
position — is bit-identical whatever the batch layout, parallel vs incremental evaluation, thread count
or device. Arithmetic decoding needs exactly the table the encoder used; float inference differs in the
last digits between batch sizes and between cached/uncached evaluation, which derails a decoder within
a few tokens (docs/design.md, "Exactness").

The rule that makes it exact
----------------------------
Every value is a function of one token's row of inputs, computed only with operations whose result is
fixed by IEEE 754 or by integer arithmetic:

  * matmuls and sums run on integers and are exact in any order: linear layers are
    `torch._int_mm` (int8 x int8 -> int32), or for few rows (decoding) kernels.c gemm_packed, an
    AVX-512 VNNI int8 GEMM on pre-packed weights (the same integers); attention scores and P.V
    are int16 x int16 -> int32
    dot products in C (FusedOps: AVX-512 VNNI where the CPU has it, else pmaddwd loops when
    decoding and int8 GEMMs on digits of the operands when encoding) or float64 GEMMs on the
    integers (TorchOps), whose sums provably stay below 2^31 / 2^53 (bounds next to the code);
    sums (RMSNorm, softmax, frequency totals) are integer sums below 2^53;
  * elementwise +, -, *, / in float64: IEEE 754 rounds each correctly, so CPU (any vector width,
    any thread count) and CUDA agree bit for bit. Square roots are Newton iterations of those
    (det_sqrt): torch.sqrt on CPU goes through MKL and is not correctly rounded. Either one torch op
    per arithmetic step (TorchOps: no addcmul, lerp, torch.compile that could contract a*b+c into
    an FMA), or the same operations in the same order in C (FusedOps, kernels.c, compiled with
    -ffp-contract=off): bit-identical, with far fewer passes over memory;
  * max, round-half-even, clamp, gather: exact;
  * exp, sigmoid, cos, sin: tables computed with exact arithmetic (mpmath / Python integers, never
    libm) when the engine is built, identical on every machine.

Quantisation (what costs compression, not exactness): weights int8 per output channel; the inputs
of wo and gate_up int8 with a per-token scale (one _int_mm pass), those of qkv, down and the LM head
int16 (split into hi/lo int8 halves, one _int_mm on the two stacked: twice the ops), because int8
there cost noticeably more bits (the measurements behind each choice: docs/benchmarks.md,
"Quantisation"). gate_up's input is smoothed SmoothQuant-style: per input channel a power of two,
from the channel's range on a fixed calibration text (calibrate(), run by the loader when it
converts a model), divides ffn_norm and multiplies the weight columns — exact in float64, no work at
run time. Keys and values 15-bit with a fixed per-channel power-of-two scale derived from a
Cauchy-Schwarz bound on the weights, so the KV cache never needs rescaling; queries int8 per token
and head; attention weights 13-bit from an exp table. The exact engine stays within a fraction of a
percent of the float32 model's bits per token.

Threading: an Engine is immutable after construction and may be shared; `freqs` and `step` allocate
their own temporaries. A `State` (KV cache) belongs to one caller. torch's own intra-op threads do not
change any result, only speed; their workers spin while they wait, so on oversubscribed cores more
threads make a step much slower: callers sharing a machine should set torch.set_num_threads to the
cores they really have. The fused C loops run on one thread.

Where the time goes (a profile of decoding and encoding steps, and how far from the int8 GEMM peak):
docs/benchmarks.md, "The exact engine". Late-position decoding is bound by reading the int16 KV cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass

import mpmath
import numpy as np
import torch

from . import backend as backends

# Bump whenever any integer the engine produces can change (quantisation, tables, formulas).
ENGINE_VERSION = 5  # 2: nearest-entry sigmoid table; 3: RMSNorm scale by det_sqrt, not torch.sqrt;
#                     4: int8 queries, 15-bit keys/values, 13-bit attention weights;
#                     5: int8 inputs for wo and gate_up (smoothed, calibrated per model)

# Frequency tables sum to at most 2^24: constriction quantises to 24 bits and float64 holds them exactly.
FREQ_TOTAL_BITS = 24
# Linear-layer inputs: int16 (|q| <= 127*128, hi/lo: two int8 passes) or int8 (|q| <= 127, one pass),
# chosen per layer type by bench/act_quant_bench.py (exact bits/token against float32, one layer type
# at a time and together; the table: docs/benchmarks.md, "Quantisation"). Kept: int8 for wo and
# smoothed gate_up (59 % of the layers' GEMM ops) at a small cost, int16 for qkv, down and the LM head,
# where int8 cost several times more.
ACT_MAX = 127 * 128
ACT8_MAX = 127
# qkv int8 (smoothed like gate_up; prepare_weights and calibrate support it) measured over budget
# for 16 % of the layers' ops (docs/benchmarks.md, "Quantisation"), so qkv keeps int16 inputs.
# (kv_exponents' +2 % margin assumes int16 rounding of qkv's input; with int8 keys/values beyond
# the bound would only be clamped: a quality, not an exactness, matter.)
QKV_INT8 = False
WO_INT8 = True
GATE_UP_INT8 = True
# Attention operands are small enough to be int8 digits for _int_mm (FusedOps.attend), at no
# measurable cost in bits/token against the wider v3 operands (docs/benchmarks.md, "Quantisation").
KV_BITS = 14  # keys/values: |int| <= 2^14 after the per-channel bound scale: 2 digits
Q_MAX = 127  # queries: int8 per token and head
P_BITS = 13  # attention weights: exp table values <= 2^13: 2 base-2^7 digits
# float64 GEMMs: scores <= 127 * 2^14 * head_dim and P.V <= 2^13 * 2^14 * T stay far below 2^53;
# int8 digit GEMMs: sums <= 127 * 128 * T < 2^31.
MAX_SEQ_LEN_LIMIT = 4096
EXP_RES_BITS = 10  # attention exp table step: 2^-10 in score units (softmax error <= 0.05 %)
LOGIT_EXP_BITS = 30  # logit exp table values <= 2^30 ...
LOGIT_RES_BITS = 12  # ... at steps of 2^-12 nats
SIG_RES_BITS = 12  # sigmoid table step 2^-12, nearest entry (196k entries, 0.2 s to build)
# Queries per attention block: smaller blocks waste less of the causal triangle, larger ones make
# fewer, bigger GEMM calls. Per 1024 tokens (v4, 1 thread): 32 -> 1.85 s, 64 -> 1.85, 128 -> 1.93,
# 256 -> 2.07.
ATTN_BLOCK = 64
# Segment rows per pass of freqs on CPU, in units of 1024 positions: the layers' temporaries grow with
# the rows and spill the caches. 1 thread, per-token speed of 1024-token rows: 1 per pass 556
# tokens/s, 2 per pass 472.
FREQS_ROWS_CPU = 1
# LM head rows per pass: the (2*rows, V) int32 GEMM output stays in cache. _int_mm at K=576,
# N=49,152, 1 thread: 2*64 rows 676 GOP/s, 2*256 rows 348 GOP/s (writing 100 MB), 2*16 rows 357.
HEAD_ROWS = 64
SIG_RANGE = 24  # sigmoid(x) for |x| > 24 is 0 or 1 to within 4e-11
# Linear layers of at most this many input rows (decoding: the batch, or twice it for int16 inputs;
# the LM head's passes of HEAD_ROWS) run on kernels.c gemm_packed, an AVX-512 VNNI int8 GEMM on
# weights packed once per engine (pack_weight), where the CPU has it and torch runs 1 thread: the
# same integers as torch._int_mm. With the weights coming from memory, as in a decoding step (1
# thread, 30 distinct weights per shape): qkv (128 rows) 686 -> 814 GOP/s, wo (64) 586 -> 798,
# gate_up (64) 536 -> 777, down (128) 748 -> 826, LM head (128) 659 -> 776; at 1024 rows oneDNN
# is faster (924 vs 832), so encoding's layers keep torch._int_mm.
PACKED_ROWS = 256


@dataclass(frozen=True)
class Config:
    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    ffn_dim: int
    rope_theta: float
    norm_eps: float
    max_seq_len: int
    bos_id: int
    tied_embeddings: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Config:
        return cls(**json.loads(s))


# ---- tables: exact arithmetic, built once per process ----------------------------------------------

_FIX = 128  # bits of the fixed-point Python integers used to build tables


def _exp_table(scale_bits: int, res_bits: int) -> np.ndarray:
    """round(2^scale_bits * exp(-i / 2^res_bits)) for i = 0.. until it reaches 0 (last entry 0).
    Built by an integer recurrence with 128 fractional bits (error << 2^-100), so every machine gets
    the same integers."""
    mpmath.mp.prec = 200
    r = int(mpmath.floor(mpmath.exp(-mpmath.mpf(1) / 2**res_bits) * 2**_FIX))
    v, out = 1 << _FIX, []
    one_half = 1 << (_FIX - scale_bits - 1)
    while True:
        q = (v + one_half) >> (_FIX - scale_bits)
        out.append(q)
        if q == 0:
            return np.array(out, dtype=np.int64)
        v = (v * r) >> _FIX


@functools.cache
def attn_exp_table() -> torch.Tensor:
    return torch.from_numpy(_exp_table(P_BITS, EXP_RES_BITS).astype(np.float64))


@functools.cache
def logit_exp_table() -> torch.Tensor:
    return torch.from_numpy(_exp_table(LOGIT_EXP_BITS, LOGIT_RES_BITS))


@functools.cache
def sigmoid_table() -> torch.Tensor:
    """sigmoid(-SIG_RANGE + i / 2^SIG_RES_BITS) as float64, from the integer exp recurrence of
    _exp_table: exp(-x) in fixed point, then 1/(1+exp(-x)) by exact integer true division."""
    mpmath.mp.prec = 200
    r = int(mpmath.floor(mpmath.exp(-mpmath.mpf(1) / 2**SIG_RES_BITS) * 2**_FIX))
    e = int(mpmath.floor(mpmath.exp(SIG_RANGE) * 2**_FIX))  # exp(-x) at x = -SIG_RANGE
    one, vals = 1 << _FIX, []
    for _ in range(2 * SIG_RANGE * 2**SIG_RES_BITS + 1):
        vals.append(one / (one + e))  # int / int: correctly rounded
        e = (e * r) >> _FIX
    return torch.tensor(vals, dtype=torch.float64)


@functools.cache
def rope_tables(head_dim: int, theta: float, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of pos * theta^(-2i/head_dim), (max_seq_len, head_dim/2) float64, via mpmath."""
    mpmath.mp.prec = 100
    half = head_dim // 2
    inv = [mpmath.power(mpmath.mpf(theta), -mpmath.mpf(2 * i) / head_dim) for i in range(half)]
    cos = np.empty((max_seq_len, half)), np.empty((max_seq_len, half))
    cos, sin = cos
    for p in range(max_seq_len):
        for i in range(half):
            c, s = mpmath.cos_sin(p * inv[i])
            cos[p, i], sin[p, i] = float(c), float(s)
    return torch.from_numpy(cos), torch.from_numpy(sin)


# ---- weight preparation (done once, on CPU, in numpy: deterministic) -----------------------------


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (N, K) -> int8 (N, K), float64 scale (N,) with w ~= q * scale[:, None]."""
    w = np.asarray(w, dtype=np.float64)
    scale = np.abs(w).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _pow2_at_least(b: np.ndarray) -> np.ndarray:
    """The exponent e of the smallest power of two with 2^e >= b (per entry)."""
    m, e = np.frexp(b)
    return np.where(m == 0.5, e - 1, e).astype(np.int64)


def kv_exponents(
    q: np.ndarray, scale: np.ndarray, norm_w: np.ndarray, dim: int, rope_pairs: bool
) -> np.ndarray:
    """Per output channel e with |output| <= 2^e for every input: the layer's input is
    rmsnorm(x) * norm_w and ||rmsnorm(x)||_2 <= sqrt(dim), so by Cauchy-Schwarz
    |out_n| <= sqrt(dim) * ||w_n * norm_w||_2 (+2 % for activation rounding). RoPE rotates channel
    pairs (2i, 2i+1), so a rotated channel is bounded by the pair's norm."""
    w = q.astype(np.float64) * scale[:, None] * np.asarray(norm_w, dtype=np.float64)[None, :]
    b2 = (w * w).sum(axis=1) * dim
    if rope_pairs:
        b2 = np.repeat(b2.reshape(-1, 2).sum(axis=1), 2)
    return _pow2_at_least(np.sqrt(b2) * 1.02 + 1e-30)


def smooth_exponents(act_max: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per input channel k of a linear layer, e_k such that dividing the input by 2^e_k and
    multiplying the weight columns by it balances their ranges (SmoothQuant with alpha = 1/2:
    2^e ~ sqrt(max|x_k| / max|W_k|)), from the binary exponents (frexp: exact, the same on every
    machine): e = floor((ex - ew) / 2). Powers of two keep both foldings exact in float64.
    (alpha = 3/4, e = floor((3 ex - ew) / 4), for gate_up and qkv: +0.75 / +1.04 %, see QKV_INT8.)"""
    wm = np.abs(np.asarray(w, dtype=np.float64)).max(axis=0)
    ex, ew = np.frexp(np.asarray(act_max, dtype=np.float64))[1], np.frexp(wm)[1]
    return np.where((act_max > 0) & (wm > 0), np.floor_divide(ex - ew, 2), 0).astype(np.int64)


def calibrate(config: Config, f: dict[str, np.ndarray], tokens: list[int]) -> dict[str, np.ndarray]:
    """Per-channel max |input| of the smoothed linear layers ("l{i}.qkv", "l{i}.gate_up") over one
    segment of `tokens`, from the exact engine on unsmoothed weights: the same numbers on every
    machine, so prepare_weights(config, f, calibrate(...)) is deterministic."""
    e = Engine(config, prepare_weights(config, f))
    e._act_max = {}
    e.freqs(torch.tensor([tokens[: config.max_seq_len]]))
    return e._act_max


def prepare_weights(
    config: Config, f: dict[str, np.ndarray], act_max: dict[str, np.ndarray] | None = None
) -> dict[str, torch.Tensor]:
    """Float weights (names below, HF orientation (out, in), RoPE as interleaved pairs like GGUF) ->
    the engine's tensors. Names: tok_emb (V, D), [lm_head (V, D)], norm (D,), and per layer i:
    l{i}.attn_norm, l{i}.wq, l{i}.wk, l{i}.wv, l{i}.wo, l{i}.ffn_norm, l{i}.w_gate, l{i}.w_up,
    l{i}.w_down. act_max (calibrate()): smooth the int8 inputs of qkv and gate_up per channel by
    powers of two, folded exactly into attn_norm / ffn_norm (divided) and the weight columns
    (multiplied)."""
    c, t = config, {}

    def put(name, w):
        q, s = quantize_weight(w)
        t[name + ".q"], t[name + ".s"] = torch.from_numpy(q), torch.from_numpy(s)
        return q, s

    put("tok_emb", f["tok_emb"])
    if not c.tied_embeddings:
        put("lm_head", f["lm_head"])
    t["norm"] = torch.from_numpy(np.asarray(f["norm"], dtype=np.float64))
    for i in range(c.n_layer):
        p = f"l{i}."
        an = np.asarray(f[p + "attn_norm"], dtype=np.float64)
        qkv = np.concatenate([f[p + "wq"], f[p + "wk"], f[p + "wv"]], axis=0).astype(np.float64)
        if act_max is not None and QKV_INT8:
            sm = np.ldexp(1.0, smooth_exponents(act_max[p + "qkv"], qkv))
            an, qkv = an / sm, qkv * sm[None, :]  # powers of two: exact
        t[p + "attn_norm"] = torch.from_numpy(an)
        fn = np.asarray(f[p + "ffn_norm"], dtype=np.float64)
        gu = np.concatenate([f[p + "w_gate"], f[p + "w_up"]], axis=0).astype(np.float64)
        if act_max is not None and GATE_UP_INT8:
            sm = np.ldexp(1.0, smooth_exponents(act_max[p + "gate_up"], gu))
            fn, gu = fn / sm, gu * sm[None, :]  # powers of two: exact
        t[p + "ffn_norm"] = torch.from_numpy(fn)
        q, s = put(p + "qkv", qkv)
        nq, nkv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        t[p + "k_exp"] = torch.from_numpy(
            kv_exponents(q[nq : nq + nkv], s[nq : nq + nkv], an, c.dim, rope_pairs=True)
        )
        t[p + "v_exp"] = torch.from_numpy(
            kv_exponents(q[nq + nkv :], s[nq + nkv :], an, c.dim, rope_pairs=False)
        )
        put(p + "wo", f[p + "wo"])
        put(p + "gate_up", gu)
        put(p + "down", f[p + "w_down"])
    return t


# ---- the integer-exact building blocks ---------------------------------------------------------------
#
# Two implementations of the same elementwise steps. TorchOps is the reference and runs on any device:
# one torch op per arithmetic step. FusedOps (CPU) calls kernels.c, which performs the same IEEE
# operations in the same order in one or two passes; the results are bit-identical (tests compare
# them), so an encoder on one and a decoder on the other agree.
#
# Linear layers: x (M, K) float64 is quantised per row to |xq| <= ACT_MAX with scale s, split
# xq = 128*hi + lo (|hi| <= 127, |lo| <= 64) and the stacked (2M, K) int8 goes through one _int_mm;
# |acc| <= 127*127*K < 2^31 for K < 133k, and 128*hi_acc + lo_acc < 2^38 is exact in int64 and float64.
# An int8 input (WO_INT8, GATE_UP_INT8) is quantised to |xq| <= ACT8_MAX and is (M, K) itself; combine
# tells the two forms apart by the accumulator's rows (2M or M for M scales).


def det_sqrt(d: torch.Tensor) -> torch.Tensor:
    """sqrt(d) for d > 0, elementwise, from +, * and / only: IEEE rounds those correctly on every
    CPU and GPU, library square roots need not — torch.sqrt on CPU goes through MKL, 1-ulp
    accurate, and gave a different last bit than sqrt() for a real RMSNorm row (engine v2 found
    this). Start at the power of two 2^ceil(e/2) >= sqrt(d) (d = m 2^e, m in [0.5, 1): within a
    factor 2) and take 7 Newton steps (relative error 1 -> 0.25 -> 0.025 -> 3e-4 -> 5e-8 -> 1e-15
    -> rounding). The power of two is built from its bits: ldexp/pow may also go through a library."""
    e = torch.frexp(d).exponent.to(torch.int64)
    k = torch.div(e + 1, 2, rounding_mode="floor")
    y = ((k + 1023) << 52).view(torch.float64)
    for _ in range(7):
        y = (y + d / y) * 0.5
    return y


def _mm(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (N, K).T -> int32, exact: torch._int_mm (CUDA; CPUs whose oneDNN has
    VNNI/AMX, or torch's own loop), else float32 K-chunks (mm_f32, the same integers). oneDNN's int8
    GEMM limited to AVX2 saturates (backend._intmm_inexact): the reference form, which runs where
    the kernels cannot be built, must not depend on that."""
    if q.device.type == "cpu" and backends._intmm_inexact():
        return backends.mm_f32(q, backends.f32_weight(w))
    return backends.mm_intmm(q, w)


pack_weight = backends.pack_weight

_UNPACKED = object()


class TorchOps:
    """Reference form: plain torch ops, one per arithmetic step (no fusion that could contract a*b+c
    into an FMA). Divisions by constants that are not powers of two divide by a device tensor:
    CUDA turns division by a Python scalar into multiplication by its reciprocal (rounds differently)."""

    def quant_rows(self, x: torch.Tensor, int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, K) float64 -> stacked hi/lo int8 (2M, K), scale (M, 1); int8: one int8 row per row
        of x, (M, K), |q| <= ACT8_MAX."""
        m = x.abs().amax(dim=1, keepdim=True)
        s = torch.where(m > 0, m / torch.full_like(m, ACT8_MAX if int8 else ACT_MAX), torch.ones_like(m))
        xq = torch.round(x / s)
        if int8:
            return xq.to(torch.int8), s
        hi = torch.round(xq / 128)
        lo = xq - hi * 128
        return torch.cat([hi, lo]).to(torch.int8), s

    def rmsnorm_quant(self, x, weight, eps, int8=False):
        """quant_rows(x * weight / sqrt(mean(x^2) + eps), int8), with the per-row 1/rms applied to the
        row's scale instead of every element. The sum of squares runs on x quantised to 21 bits per
        row (exact integer sum < 2^51); the square root is det_sqrt."""
        m = x.abs().amax(dim=-1, keepdim=True)
        sr = torch.where(m > 0, m / 2**20, torch.ones_like(m))
        xi = torch.round(x / sr)
        ss = (xi * xi).sum(dim=-1, keepdim=True)  # integers < 2^51: exact
        d = ss / torch.full_like(ss, x.shape[-1])
        d = d * sr
        d = d * sr
        d = d + eps
        q, sh = self.quant_rows(x * weight, int8)
        return q, sh / det_sqrt(d)

    def combine(self, acc, ws, s, residual=None):
        """Accumulators -> float64 (M, N) = value * ws * s (+ residual). acc is (2M, N), stacked hi/lo
        (value = 128 hi + lo), for an int16 input, (M, N) for an int8 one (s is (M, 1))."""
        n = s.shape[0]
        if acc.shape[0] == 2 * n:
            y = acc[:n].to(torch.int64).mul_(128).add_(acc[n:]).to(torch.float64)  # exact, < 2^38
        else:
            y = acc.to(torch.float64)
        y = y.mul_(ws).mul_(s)
        return y if residual is None else residual + y

    def swiglu_quant(self, acc, ws, s, sig):
        """gate_up accumulators -> quant_rows(silu(gate) * up); sigmoid from the nearest entry of an
        exact table (step 2^-12: relative error <= 3e-5, below the int16 quantisation that follows)."""
        y = self.combine(acc, ws, s)
        gate, up = y.chunk(2, dim=-1)
        i = (gate.clamp(-SIG_RANGE, SIG_RANGE) + SIG_RANGE).mul_(2**SIG_RES_BITS).round_().long()
        return self.quant_rows(gate * sig[i] * up)

    def qkv_post(self, h, B, T, nh, nkv, hs, qpos, cos, sin, kscale, vscale, qkscale):
        """qkv projection rows -> qi (B, nh, T, hs), f (B, nh, T, 1), ki, vi (B, nkv, T, hs).
        RoPE on q and k; keys and values on a fixed power-of-two grid per channel (exact division;
        the clamp is a safety net); queries times their group's key scale, then 16-bit per token
        and head; f = the query scale in softmax table steps per score unit."""
        q, k, v = h.split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        cos, sin = cos[qpos].unsqueeze(1), sin[qpos].unsqueeze(1)  # (B, 1, T, hs/2)
        q = _rope(q.view(B, T, nh, hs).transpose(1, 2), cos, sin)  # (B, nh, T, hs)
        k = _rope(k.view(B, T, nkv, hs).transpose(1, 2), cos, sin)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        lim = float(2**KV_BITS)
        ki = torch.round(k / kscale).clamp_(-lim, lim)
        vi = torch.round(v / vscale).clamp_(-lim, lim)
        q = q * qkscale
        m = q.abs().amax(dim=-1, keepdim=True)
        qs = torch.where(m > 0, m / torch.full_like(m, Q_MAX), torch.ones_like(m))  # (B, nh, T, 1)
        qi = torch.round(q / qs)
        return qi, qs * _score_steps(hs), ki, vi

    def softmax_weights(self, s, qpos, f, table):
        """Integer scores s (B, G, Tq, Tk), in place -> weights p (ints <= 2^20) and row sums l
        (B, G, Tq, 1), exact. Query t of row b sees keys 0..qpos[b, t]; hidden keys get weight 0."""
        hidden = torch.arange(s.shape[-1], device=s.device) > qpos[:, None, :, None]
        s.masked_fill_(hidden, float("-inf"))
        d = s.sub_(s.amax(dim=-1, keepdim=True)).neg_()  # max - s: exact, inf if hidden
        idx = d.mul_(f.view(s.shape[:-1] + (1,))).round_().clamp_(max=table.numel() - 1).long()
        p = table[idx]
        return p, p.sum(dim=-1, keepdim=True)

    def attend(self, qi, f, keys, values, qpos, kmax, vscale, table, out):
        """Causal attention of qi (B, nh, T, hs) over keys/values (B, nkv, >=Tk, hs) -> out.
        Queries go in blocks of ATTN_BLOCK that only read the keys they can see (kmax[j]: keys
        visible to block j): causal attention then costs ~T^2/2, and the (block, keys) temporaries
        stay small. A row's result does not depend on the blocking: hidden keys get weight exactly
        0 and every sum is exact. Scores and P.V are float64 GEMMs on integers (exact, < 2^53)."""
        B, nh, T, hs = qi.shape
        nkv = keys.shape[1]
        g = nh // nkv
        for j, a in enumerate(range(0, T, ATTN_BLOCK)):
            Tq, Tk = min(ATTN_BLOCK, T - a), kmax[j]
            # query heads grouped under their key/value head (GQA) instead of repeating k and v
            q = qi[:, :, a : a + Tq].reshape(B, nkv, g * Tq, hs)
            k = keys[:, :, :Tk].to(torch.float64)  # no copy unless the int16 cache
            s = q @ k.transpose(-1, -2)  # (B, nkv, g*Tq, Tk) integers
            p, l = self.softmax_weights(
                s.view(B, nh, Tq, Tk),
                qpos[:, a : a + Tq].contiguous(),
                f[:, :, a : a + Tq].contiguous(),
                table,
            )
            o = p.view(B, nkv, g * Tq, Tk) @ values[:, :, :Tk].to(torch.float64)  # integers
            self.attn_out(o, vscale, l, out, a, g)

    def store_kv(self, ki, vi, pos, keys, values):
        """Row b's key and value ki, vi (B, nkv, 1, hs) into the cache at position pos[b]."""
        rows = torch.arange(ki.shape[0], device=ki.device)
        keys[rows, :, pos] = ki[:, :, 0].to(keys.dtype)  # integers: exact
        values[rows, :, pos] = vi[:, :, 0].to(values.dtype)

    def attn_out(self, o, vscale, l, out, t0, g):
        """o (B, nkv, g*Tq, hs) integer P.V sums -> out[:, t0:t0+Tq] (B, T, nh*hs) = o * vscale / l."""
        B, nkv, gT, hs = o.shape
        Tq = gT // g
        a = o * vscale
        a = a / l.view(B, nkv, gT, 1)
        out[:, t0 : t0 + Tq] = a.view(B, nkv * g, Tq, hs).transpose(1, 2).reshape(B, Tq, -1)

    def head_freqs(self, acc, ws, s, table, budget, out):
        """LM head accumulators -> out (M, V) int32 frequencies: logits z (2^LOGIT_RES_BITS per nat,
        folded into ws), e = exp table at round(max - z), freq = e * budget // sum(e) + 1."""
        z = self.combine(acc, ws, s)
        d = z.sub_(z.amax(dim=-1, keepdim=True)).neg_()  # max - z >= 0
        e = table[d.round_().clamp_(max=table.numel() - 1).long()]  # int64 <= 2^30
        total = e.sum(dim=-1, keepdim=True)  # exact, >= 2^30
        out.copy_(e.mul_(budget).floor_divide_(total).add_(1))  # e * budget < 2^54


def _score_steps(hs: int) -> float:
    """Softmax table steps per unit of the integer score, per unit of query scale: scores are
    q.k / sqrt(hs) nats and the exp table steps by 2^-EXP_RES_BITS nats."""
    return 2.0**EXP_RES_BITS / math.sqrt(hs)


_TABLE32: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _table32(table: torch.Tensor) -> torch.Tensor:
    """The attention exp table as int32 (its entries are integers <= 2^P_BITS), converted once per
    table (the engine's is built once per process)."""
    hit = _TABLE32.get(id(table))
    if hit is None or hit[0] is not table:
        hit = _TABLE32[id(table)] = (table, table.to(torch.int32))
    return hit[1]


def _ptr(t: torch.Tensor, dtype: torch.dtype) -> int:
    assert t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu", (t.dtype, t.shape)
    return t.data_ptr()


# kernels.c attend_fwd's impl for FusedOps.attention: the VNNI tile or the AVX2 one
_FWD_IMPL = {"vnni": 2, "avx2": 3}


class FusedOps(TorchOps):
    """The same steps through kernels.c (CPU only): one or two passes instead of ~10 torch ops."""

    def __init__(self, lib, impl: int = 0, attention: str = "vnni", digits_mm=None):
        """impl: which form of the C kernels runs (attention, head_freqs, ...), 0 the fastest the
        CPU allows, 1 the portable one, 2 AVX-512 (VNNI for attention) where the CPU has it
        (tests compare them). attention, when encoding (the backend decides,
        codec/lm/backend.py): "vnni" / "avx2" kernels.c attend_fwd's VNNI or AVX2 tile where the CPU
        has it (on the engine's threads), else "digits";
        "digits" int8 GEMMs on digits of the operands by digits_mm (a (M, K), b (N, K)) -> a @ b.T
        int32 (default torch._int_mm); "steps" kernels.c attend_step once per query."""
        self.lib = lib
        self.impl = impl
        self.attention = attention
        self.digits_mm = digits_mm or _mm
        self.threads = 1  # POSIX threads of attend_step and attend_fwd (Engine.threads sets it)

    def quant_rows(self, x, int8=False):
        M, K = x.shape
        q = torch.empty(M if int8 else 2 * M, K, dtype=torch.int8)
        s = torch.empty(M, 1, dtype=torch.float64)
        self.lib.quant_rows(_ptr(x, torch.float64), M, K, q.data_ptr(), s.data_ptr(), int8, self.impl)
        return q, s

    def rmsnorm_quant(self, x, weight, eps, int8=False):
        M, K = x.shape
        q = torch.empty(M if int8 else 2 * M, K, dtype=torch.int8)
        s = torch.empty(M, 1, dtype=torch.float64)
        self.lib.rmsnorm_quant(
            _ptr(x, torch.float64),
            M,
            K,
            _ptr(weight, torch.float64),
            eps,
            q.data_ptr(),
            s.data_ptr(),
            int8,
            self.impl,
        )
        return q, s

    def combine(self, acc, ws, s, residual=None):
        M, N = s.shape[0], acc.shape[1]
        y = torch.empty(M, N, dtype=torch.float64) if residual is None else residual
        self.lib.combine(
            _ptr(acc, torch.int32),
            M,
            N,
            _ptr(ws, torch.float64),
            _ptr(s, torch.float64),
            _ptr(y, torch.float64),
            residual is not None,
            acc.shape[0] == 2 * M,
        )
        return y

    def swiglu_quant(self, acc, ws, s, sig):
        M, F = s.shape[0], acc.shape[1] // 2
        q = torch.empty(2 * M, F, dtype=torch.int8)
        qs = torch.empty(M, 1, dtype=torch.float64)
        self.lib.swiglu_quant(
            _ptr(acc, torch.int32),
            M,
            F,
            _ptr(ws, torch.float64),
            _ptr(s, torch.float64),
            _ptr(sig, torch.float64),
            q.data_ptr(),
            qs.data_ptr(),
            acc.shape[0] == 2 * M,
            self.impl,
        )
        return q, qs

    def qkv_post(self, h, B, T, nh, nkv, hs, qpos, cos, sin, kscale, vscale, qkscale):
        qi = torch.empty(B, nh, T, hs, dtype=torch.float64)
        f = torch.empty(B, nh, T, 1, dtype=torch.float64)
        ki = torch.empty(B, nkv, T, hs, dtype=torch.float64)
        vi = torch.empty(B, nkv, T, hs, dtype=torch.float64)
        qpos = qpos.contiguous()  # held here: the C call only sees its address
        self.lib.qkv_post(
            _ptr(h, torch.float64),
            B,
            T,
            nh,
            nkv,
            hs,
            _ptr(qpos, torch.int64),
            _ptr(cos, torch.float64),
            _ptr(sin, torch.float64),
            _ptr(kscale, torch.float64),
            _ptr(vscale, torch.float64),
            _ptr(qkscale, torch.float64),
            float(2**KV_BITS),
            float(Q_MAX),
            _score_steps(hs),
            qi.data_ptr(),
            f.data_ptr(),
            ki.data_ptr(),
            vi.data_ptr(),
        )
        return qi, f, ki, vi

    def softmax_weights(self, s, qpos, f, table):
        B, G, Tq, Tk = s.shape
        l = torch.empty(B, G, Tq, 1, dtype=torch.float64)
        self.lib.softmax_weights(
            _ptr(s, torch.float64),
            B,
            G,
            Tq,
            Tk,
            _ptr(qpos, torch.int64),
            _ptr(f, torch.float64),
            _ptr(table, torch.float64),
            table.numel(),
            l.data_ptr(),
        )
        return s, l

    def attend(self, qi, f, keys, values, qpos, kmax, vscale, table, out):
        """As TorchOps.attend. More than one query per row (encoding): with AVX-512 VNNI, one C
        call (kernels.c attend_fwd) does scores, weights and P.V on the int16 integers, fused per
        tile of query rows (0.23 s per 1024 tokens, 1 thread); otherwise (impl=1, other CPUs) the
        scores and P.V run on int8 GEMMs of base-2^8 digits of the keys/values (2 each) and
        base-2^7 digits of the weights (2): the same integers as the float64 GEMMs at ~600-950
        GOP/s instead of ~45 GFLOP/s (0.47 s). One query per row (decoding) reads the int16 KV
        cache in C (kernels.c attend_step, VNNI or portable): as GEMMs that would be one (g, hs)
        by (hs, Tk) product per row and head group; at late positions it is bound by reading the
        cache from memory (batch 64, position 960: 1.4 GB per step)."""
        B, nh, T, hs = qi.shape
        nkv = keys.shape[1]
        if T == 1:  # decoding: the int16 cache
            pos = qpos[:, 0].contiguous()
            table32 = _table32(table)  # entries <= 2^P_BITS
            self.lib.attend_step(
                _ptr(qi, torch.float64),
                _ptr(f, torch.float64),
                _ptr(keys, torch.int16),
                _ptr(values, torch.int16),
                B,
                nkv,
                nh // nkv,
                keys.shape[2],
                hs,
                _ptr(pos, torch.int64),
                _ptr(table32, torch.int32),
                table.numel(),
                _ptr(vscale, torch.float64),
                _ptr(out, torch.float64),
                self.impl,
                self.threads,
                1,
            )
            return
        if self.impl != 1 and self.attention in _FWD_IMPL and keys.dtype == torch.float64:
            qp = qpos.contiguous()
            if self.lib.attend_fwd(
                _ptr(qi, torch.float64),
                _ptr(f, torch.float64),
                _ptr(keys, torch.float64),
                _ptr(values, torch.float64),
                B,
                nkv,
                nh // nkv,
                T,
                keys.shape[2],
                hs,
                _ptr(qp, torch.int64),
                _ptr(_table32(table), torch.int32),
                table.numel(),
                _ptr(vscale, torch.float64),
                _ptr(out, torch.float64),
                _FWD_IMPL[self.attention],
                self.threads,
            ):
                return
        if self.attention in ("steps", "avx2"):  # per query on int16 keys (avx2: a shape its tile lacks)
            k16 = keys.to(torch.int16).contiguous()  # |x| <= 2^KV_BITS: exact
            v16 = values.to(torch.int16).contiguous()
            q = qi.transpose(1, 2).contiguous()  # (B, T, nh, hs)
            fq = f.view(B, nh, T).transpose(1, 2).contiguous()  # (B, T, nh)
            pos = qpos.contiguous()
            self.lib.attend_step(
                q.data_ptr(),
                fq.data_ptr(),
                k16.data_ptr(),
                v16.data_ptr(),
                B * T,
                nkv,
                nh // nkv,
                keys.shape[2],
                hs,
                _ptr(pos, torch.int64),
                _ptr(_table32(table), torch.int32),
                table.numel(),
                _ptr(vscale, torch.float64),
                _ptr(out, torch.float64),
                self.impl,
                self.threads,
                T,
            )
            return
        g = nh // nkv
        Tall = keys.shape[2]  # T, or a prefix's keys (Engine.prefix) + T
        kd = torch.empty(B, nkv, Tall, 2, hs, dtype=torch.int8)  # key digits: rows (key, digit)
        vd = torch.empty(B, nkv, 2, hs, Tall, dtype=torch.int8)  # value digits, keys last
        self.lib.split_kv(
            _ptr(keys, torch.float64),
            _ptr(values, torch.float64),
            B * nkv,
            Tall,
            hs,
            kd.data_ptr(),
            vd.data_ptr(),
        )
        q8 = qi.to(torch.int8)  # |qi| <= Q_MAX
        table32 = table.to(torch.int32)  # entries <= 2^P_BITS
        for j, a in enumerate(range(0, T, ATTN_BLOCK)):
            Tq, Tk = min(ATTN_BLOCK, T - a), kmax[j]
            q = q8[:, :, a : a + Tq].reshape(B, nkv, g * Tq, hs)
            sd = torch.empty(B, nkv, g * Tq, 2 * Tk, dtype=torch.int32)  # score digits
            for b in range(B):
                for kv in range(nkv):
                    sd[b, kv] = self.digits_mm(q[b, kv], kd[b, kv, :Tk].view(2 * Tk, hs))
            pd = torch.empty(B, nkv, 2 * g * Tq, Tk, dtype=torch.int8)  # weight digits
            l = torch.empty(B, nh, Tq, 1, dtype=torch.float64)
            qp, fb = qpos[:, a : a + Tq].contiguous(), f[:, :, a : a + Tq].contiguous()
            self.lib.softmax_digits(
                sd.data_ptr(),
                B,
                nkv,
                g,
                Tq,
                Tk,
                _ptr(qp, torch.int64),
                _ptr(fb, torch.float64),
                _ptr(table32, torch.int32),
                table.numel(),
                pd.data_ptr(),
                l.data_ptr(),
            )
            o = torch.empty(B, nkv, 2 * g * Tq, 2 * hs, dtype=torch.int32)
            for b in range(B):
                for kv in range(nkv):
                    o[b, kv] = self.digits_mm(pd[b, kv], vd[b, kv, :, :, :Tk].reshape(2 * hs, Tk))
            self.lib.attn_out_digits(
                o.data_ptr(),
                B,
                nkv,
                g,
                Tq,
                hs,
                _ptr(vscale, torch.float64),
                l.data_ptr(),
                _ptr(out, torch.float64),
                out.shape[1],
                a,
            )

    def store_kv(self, ki, vi, pos, keys, values):
        """As TorchOps.store_kv, in C (kernels.c kv_store): one call instead of two index_puts."""
        if keys.dtype != torch.int16 or not keys.is_contiguous() or not values.is_contiguous():
            return super().store_kv(ki, vi, pos, keys, values)
        B, nkv, _, hs = ki.shape
        pos = pos.contiguous()
        self.lib.kv_store(
            _ptr(ki, torch.float64),
            _ptr(vi, torch.float64),
            B,
            nkv,
            hs,
            _ptr(pos, torch.int64),
            keys.shape[2],
            _ptr(keys, torch.int16),
            _ptr(values, torch.int16),
        )

    def attn_out(self, o, vscale, l, out, t0, g):
        B, nkv, gT, hs = o.shape
        self.lib.attn_out(
            _ptr(o, torch.float64),
            B,
            nkv,
            g,
            gT // g,
            hs,
            _ptr(vscale, torch.float64),
            _ptr(l, torch.float64),
            _ptr(out, torch.float64),
            out.shape[1],
            t0,
        )

    def head_freqs(self, acc, ws, s, table, budget, out):
        return self.lib.head_freqs(
            _ptr(acc, torch.int32),
            acc.shape[0] // 2,
            acc.shape[1],
            _ptr(ws, torch.float64),
            _ptr(s, torch.float64),
            _ptr(table, torch.int64),
            table.numel(),
            budget,
            _ptr(out, torch.int32),
            self.impl,
        )


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1). x (B, h, T, hs); cos, sin (B, 1, T, hs/2)."""
    a, b = x[..., 0::2], x[..., 1::2]
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    return torch.stack([ra, rb], dim=-1).flatten(-2)


@dataclass
class State:
    """KV cache of `start`/`step`: int16 keys and values per layer, and each row's next position
    (rows are independent: `reset_rows` starts a new segment in some of them)."""

    k: list[torch.Tensor]  # per layer (B, n_kv_head, max_len, hs)
    v: list[torch.Tensor]
    pos: torch.Tensor  # (B,) int64, CPU
    max_len: int

    def rows(self, n: int) -> State:
        """A state of the first n rows sharing this one's cache and positions (views): stepping it
        steps those rows of this state and leaves the others as they are."""
        return State([k[:n] for k in self.k], [v[:n] for v in self.v], self.pos[:n], self.max_len)


@dataclass
class Prefix:
    """The KV state of a priming context (Engine.prefix): int16 keys and values per layer, one row,
    `length` positions. Read-only once made; shared by every row and thread that continues it."""

    k: list[torch.Tensor]  # per layer (1, n_kv_head, length, hs)
    v: list[torch.Tensor]
    length: int


class Engine:
    def __init__(
        self,
        config: Config,
        tensors: dict[str, torch.Tensor],
        device: torch.device | str = "cpu",
        fused: bool | None = None,
        backend: backends.Backend | str | None = None,
        threads: int = 1,
    ):
        """fused: use kernels.c for the elementwise steps (CPU only; default: when it builds).
        backend: the CPU's GEMM forms (codec/lm/backend.py; default: backend.current(), measured
        or forced by LLMFS_BACKEND; a name selects one). threads: POSIX threads of kernels.c's
        GEMMs (no spin-waiting; torch's own thread count is the caller's). The frequencies are the
        same either way."""
        if config.max_seq_len > MAX_SEQ_LEN_LIMIT:
            config = Config(**{**asdict(config), "max_seq_len": MAX_SEQ_LEN_LIMIT})
        self.config = config
        self.vocab_size = config.vocab_size
        self.bos_id = config.bos_id
        self.max_seq_len = config.max_seq_len
        self.tensors = tensors  # CPU originals, the on-disk form
        self.fingerprint = self._fingerprint(config, tensors)
        self.device = torch.device(device)
        self._t = {k: v.to(self.device) for k, v in tensors.items()}
        self.backend = None
        if self.device.type == "cpu":
            self.backend = backend if isinstance(backend, backends.Backend) else backends.select(backend)
        lib = self.backend.lib if fused is not False and self.backend is not None else None
        if fused and lib is None:
            raise RuntimeError("fused kernels requested but unavailable (CPU and a C compiler)")
        self._ops = (
            FusedOps(lib, attention=self.backend.attention, digits_mm=self.backend.digits_mm())
            if lib is not None
            else TorchOps()
        )
        self.fused = lib is not None
        self.threads = threads
        cos, sin = rope_tables(config.head_dim, config.rope_theta, config.max_seq_len)
        self._cos, self._sin = cos.to(self.device), sin.to(self.device)
        self._exp = attn_exp_table().to(self.device)
        self._lexp = logit_exp_table().to(self.device)
        self._sig = sigmoid_table().to(self.device)
        # 2^(e - KV_BITS) exactly (np.ldexp), not exp2 of a float on the device
        sc = lambda e: (
            torch.from_numpy(np.ldexp(1.0, e.numpy() - KV_BITS))
            .view(config.n_kv_head, 1, config.head_dim)
            .to(self.device)
        )
        w = "tok_emb" if config.tied_embeddings else "lm_head"
        self._head_scale = self._t[w + ".s"] * 2.0**LOGIT_RES_BITS
        self._kvscale = [
            (sc(tensors[f"l{i}.k_exp"]), sc(tensors[f"l{i}.v_exp"])) for i in range(config.n_layer)
        ]
        g = config.n_head // config.n_kv_head
        # the key scale folded into each query head: (nh, 1, hs)
        self._qkscale = [k.repeat_interleave(g, dim=0) for k, _ in self._kvscale]
        self._act_max: dict[str, np.ndarray] | None = None  # calibrate() only
        # per weight name, made on first use: pack_weight's layout (vnni, avx2), float32 (blas)
        self._packed: dict[str, torch.Tensor | None] = {}
        self._f32: dict[str, torch.Tensor] = {}
        self._pack_lock = threading.Lock()

    @property
    def threads(self) -> int:
        """POSIX threads of kernels.c's GEMMs and decoding attention (they never spin-wait)."""
        return self._threads

    @threads.setter
    def threads(self, n: int) -> None:
        self._threads = max(1, int(n))
        self._ops.threads = self._threads

    def _matmul(self, q: torch.Tensor, name: str, stacked: bool = False) -> torch.Tensor:
        """int8 rows q (M, K) @ weight `name` (N, K).T -> int32 (M, N), exact, by the backend's
        form for few rows (at most PACKED_ROWS) or many: kernels.c gemm_packed (vnni, avx2),
        float32 chunks (blas) or torch._int_mm (intmm); the same integers. stacked: q is an int16
        input's hi/lo halves (quant_rows); avx2 then multiplies the rebuilt int16 rows in one pass
        (gemm_packed16), giving other int32 halves of the same values 128 hi + lo, which is all
        that combine, swiglu_quant and head_freqs read."""
        w = self._t[name]
        b = self.backend
        form = None if b is None or not self.fused else b.few if q.shape[0] <= PACKED_ROWS else b.many
        if self.threads > 1 and form in ("intmm", "blas") and b.few in ("vnni", "avx2"):
            form = b.few  # runs on the engine's threads; torch's run on one here
        if form in ("vnni", "avx2"):
            wp = self._packed.get(name, _UNPACKED)
            if wp is _UNPACKED:
                with self._pack_lock:
                    wp = self._packed.get(name, _UNPACKED)
                    if wp is _UNPACKED:
                        N, K = w.shape
                        # gemm_packed answers 0 without touching memory when it cannot run here
                        ok = (
                            N % 16 == 0
                            and K % 4 == 0
                            and self._ops.lib.gemm_packed(None, 0, K, None, N, None, backends._IMPL[form], 1)
                            > 0
                        )
                        wp = self._packed[name] = pack_weight(w) if ok else None
            if wp is not None and stacked and form == "avx2":
                out = backends.gemm_packed16(self._ops.lib, q, wp, w.shape[0], self.threads)
                if out is not None:
                    return out
            if wp is not None:
                out = backends.gemm_packed(self._ops.lib, form, q, wp, w.shape[0], self.threads)
                if out is not None:
                    return out
        elif form == "blas":
            wf = self._f32.get(name)
            if wf is None:
                with self._pack_lock:
                    wf = self._f32.get(name)
                    if wf is None:
                        wf = self._f32[name] = backends.f32_weight(w)
            return backends.mm_f32(q, wf)
        return _mm(q, w)

    def _record(self, name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
        """Per-channel max of |rmsnorm(x) * weight| into _act_max[name] (calibrate()); 1/rms as in
        TorchOps.rmsnorm_quant, from an exact integer sum."""
        m = x.abs().amax(dim=-1, keepdim=True)
        sr = torch.where(m > 0, m / 2**20, torch.ones_like(m))
        xi = torch.round(x / sr)
        d = (xi * xi).sum(dim=-1, keepdim=True) / x.shape[-1] * sr * sr + self.config.norm_eps
        a = (x * weight / det_sqrt(d)).abs().amax(dim=0).cpu().numpy()
        self._act_max[name] = np.maximum(self._act_max[name], a) if name in self._act_max else a

    @staticmethod
    def _fingerprint(config: Config, tensors: dict[str, torch.Tensor]) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(b"llmfs-engine-%d\0" % ENGINE_VERSION)
        h.update(config.to_json().encode())
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
            h.update(t.numpy().tobytes())
        return h.digest()

    def to(self, device) -> Engine:
        if torch.device(device) == self.device:
            return self
        return Engine(self.config, self.tensors, device, threads=self.threads)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        vocab_size: int = 259,
        dim: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_kv_head: int = 2,
        ffn_dim: int = 128,
        max_seq_len: int = 256,
        bos_id: int | None = None,
    ) -> Engine:
        """A deterministic random model for tests: same code path as a real one."""
        rng = np.random.default_rng(seed)
        hs = dim // n_head
        cfg = Config(
            vocab_size=vocab_size,
            dim=dim,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=n_kv_head,
            head_dim=hs,
            ffn_dim=ffn_dim,
            rope_theta=10000.0,
            norm_eps=1e-5,
            max_seq_len=max_seq_len,
            bos_id=vocab_size - 1 if bos_id is None else bos_id,
        )
        g = lambda *s, std=1.0: rng.normal(0, std, size=s)
        f = {"tok_emb": g(vocab_size, dim), "norm": 1 + g(dim, std=0.1)}
        for i in range(n_layer):
            p = f"l{i}."
            f |= {
                p + "attn_norm": 1 + g(dim, std=0.1),
                p + "ffn_norm": 1 + g(dim, std=0.1),
                p + "wq": g(n_head * hs, dim, std=dim**-0.5),
                p + "wk": g(n_kv_head * hs, dim, std=dim**-0.5),
                p + "wv": g(n_kv_head * hs, dim, std=dim**-0.5),
                p + "wo": g(dim, n_head * hs, std=(n_head * hs) ** -0.5),
                p + "w_gate": g(ffn_dim, dim, std=dim**-0.5),
                p + "w_up": g(ffn_dim, dim, std=dim**-0.5),
                p + "w_down": g(dim, ffn_dim, std=ffn_dim**-0.5),
            }
        return cls(cfg, prepare_weights(cfg, f))

    # ---- forward ----------------------------------------------------------------------------------

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N,) -> (N, D) float64."""
        t = self._t
        return t["tok_emb.q"][tokens].to(torch.float64) * t["tok_emb.s"][tokens].unsqueeze(-1)

    def _qkv(self, i: int, h: torch.Tensor, B: int, T: int, qpos: torch.Tensor):
        """qkv projection (B*T, (nh+2nkv)*hs) at positions qpos (B, T) -> integer queries
        qi (B, nh, T, hs) with their softmax index factor f (B, nh, T, 1), and integer keys and
        values (B, nkv, T, hs) on the fixed per-channel grid."""
        c = self.config
        kscale, vscale = self._kvscale[i]
        return self._ops.qkv_post(
            h,
            B,
            T,
            c.n_head,
            c.n_kv_head,
            c.head_dim,
            qpos,
            self._cos,
            self._sin,
            kscale,
            vscale,
            self._qkscale[i],
        )

    def _attend(
        self, i: int, qi, f, keys, values, qpos: torch.Tensor, kmax: list[int], out: torch.Tensor
    ) -> None:
        """qi (B, nh, T, hs) at positions qpos (B, T); keys/values (B, nkv, >=Tk, hs) at positions
        0..; query (b, t) sees keys 0..qpos[b, t]. Writes out (B, T, nh*hs) float64."""
        self._ops.attend(qi, f, keys, values, qpos, kmax, self._kvscale[i][1], self._exp, out)

    def _layer(
        self,
        i: int,
        x: torch.Tensor,
        B: int,
        T: int,
        qpos: torch.Tensor,
        kmax: list[int],
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        prefix: Prefix | None = None,
        record: list | None = None,
    ) -> torch.Tensor:
        """One transformer block on x (B*T, D) float64 (may be updated in place). Without a cache
        the keys are `prefix`'s (if any) then the T positions' own; with one, row b's keys go to
        cache position qpos[b, 0]. `record` (a list) receives this layer's keys and values."""
        c, t, ops, p = self.config, self._t, self._ops, f"l{i}."
        if self._act_max is not None:  # calibrate(): input maxima
            self._record(p + "qkv", x, t[p + "attn_norm"])
        hq, s = ops.rmsnorm_quant(x, t[p + "attn_norm"], c.norm_eps, QKV_INT8)
        h = ops.combine(self._matmul(hq, p + "qkv.q", not QKV_INT8), t[p + "qkv.s"], s)
        qi, f, ki, vi = self._qkv(i, h, B, T, qpos)
        if record is not None:  # prefix(): this layer's keys and values, as the cache holds them
            record.append((ki.to(torch.int16), vi.to(torch.int16)))
        if cache is None:
            keys, values = ki, vi
            if prefix is not None:  # hidden() after a prefix: its keys come first
                pk, pv = (x.to(ki.dtype).expand(B, -1, -1, -1) for x in (prefix.k[i], prefix.v[i]))
                keys, values = torch.cat([pk, ki], dim=2), torch.cat([pv, vi], dim=2)
        else:
            keys, values = cache
            ops.store_kv(ki, vi, qpos[:, 0], keys, values)
        a = torch.empty(B, T, c.n_head * c.head_dim, dtype=torch.float64, device=x.device)
        self._attend(i, qi, f, keys, values, qpos, kmax, a)
        aq, s = ops.quant_rows(a.view(B * T, -1), WO_INT8)
        x = ops.combine(self._matmul(aq, p + "wo.q", not WO_INT8), t[p + "wo.s"], s, residual=x)
        if self._act_max is not None:  # calibrate(): input maxima
            self._record(p + "gate_up", x, t[p + "ffn_norm"])
        hq, s = ops.rmsnorm_quant(x, t[p + "ffn_norm"], c.norm_eps, GATE_UP_INT8)
        mq, s = ops.swiglu_quant(
            self._matmul(hq, p + "gate_up.q", not GATE_UP_INT8), t[p + "gate_up.s"], s, self._sig
        )
        return ops.combine(self._matmul(mq, p + "down.q", True), t[p + "down.s"], s, residual=x)

    @torch.no_grad()
    def head(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states x (N, D) float64 -> int32 frequencies (N, V) (into `out` if given):
        every entry >= 1, total <= 2^FREQ_TOTAL_BITS. Rows are independent: any subset of
        hidden()'s rows, in any order, gives the same rows as freqs()."""
        c, t = self.config, self._t
        w = "tok_emb" if c.tied_embeddings else "lm_head"
        if out is None:
            out = torch.empty(x.shape[0], c.vocab_size, dtype=torch.int32, device=x.device)
        budget = 2**FREQ_TOTAL_BITS - c.vocab_size
        for r in range(0, x.shape[0], HEAD_ROWS):  # bounds (rows, V) temporaries
            hq, s = self._ops.rmsnorm_quant(x[r : r + HEAD_ROWS], t["norm"], c.norm_eps)
            # logits * 2^LOGIT_RES_BITS: the power of two is folded into the weight scale (exact)
            self._ops.head_freqs(
                self._matmul(hq, w + ".q", True),
                self._head_scale,
                s,
                self._lexp,
                budget,
                out[r : r + HEAD_ROWS],
            )
        return out

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError("token id out of range")

    @torch.no_grad()
    def freqs(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> int32 (B, T, V); row t = frequencies of the token at t+1."""
        B, T = tokens.shape
        return self.head(self.hidden(tokens).view(B * T, -1)).view(B, T, -1)

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
        """tokens (B, T) -> the final hidden states (B, T, D) float64, head()'s input: one parallel
        pass. 4.7 MB per 1024 positions of SmolLM2, where its frequencies take 201 MB — an encoder
        that runs head() on a few positions at a time never holds whole tables. With a `prefix`
        (Engine.prefix) every row continues it: its tokens sit at positions prefix.length.. and
        attend to the prefix's cached keys, the same integers as hidden() of prefix + tokens."""
        B, T = tokens.shape
        L = 0 if prefix is None else prefix.length
        if L + T > self.max_seq_len:
            raise ValueError(f"segment of {L} + {T} tokens exceeds max_seq_len {self.max_seq_len}")
        self._check(tokens)
        out = torch.empty(B, T, self.config.dim, dtype=torch.float64, device=self.device)
        tokens = tokens.to(self.device)
        # rows are independent: passes of a few rows give the same states with a smaller working set
        rows = max(1, FREQS_ROWS_CPU * 1024 // max(T, 1)) if self.fused else B
        kmax = [L + min(a + ATTN_BLOCK, T) for a in range(0, T, ATTN_BLOCK)]
        for r in range(0, B, rows):
            n = min(rows, B - r)
            x = self._embed(tokens[r : r + n].reshape(-1))  # (n*T, D)
            qpos = torch.arange(L, L + T, device=self.device).expand(n, T)
            for i in range(self.config.n_layer):
                x = self._layer(i, x, n, T, qpos, kmax, None, prefix)
            out[r : r + n] = x.view(n, T, -1)
        return out

    @torch.no_grad()
    def prefix(self, tokens: list[int]) -> Prefix:
        """The KV state of `tokens` at positions 0.. (a priming context: the caller includes BOS):
        computed once, then shared by every row that continues it (hidden(prefix=),
        reset_rows(prefix=)). Its keys and values are the integers step() would have cached for
        these tokens (keys at a position depend only on earlier positions, all exact)."""
        t = torch.tensor([list(tokens)], dtype=torch.long)
        T = t.shape[1]
        if not 1 <= T < self.max_seq_len:
            raise ValueError(f"prefix of {T} tokens: 1 .. {self.max_seq_len - 1} allowed")
        self._check(t)
        x = self._embed(t.to(self.device).reshape(-1))
        qpos = torch.arange(T, device=self.device).expand(1, T)
        kmax = [min(a + ATTN_BLOCK, T) for a in range(0, T, ATTN_BLOCK)]
        kv: list = []
        for i in range(self.config.n_layer):
            x = self._layer(i, x, 1, T, qpos, kmax, None, record=kv)
        return Prefix([k.contiguous() for k, _ in kv], [v.contiguous() for _, v in kv], T)

    def start(self, batch: int, max_len: int) -> State:
        if max_len > self.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds max_seq_len {self.max_seq_len}")
        c = self.config
        shape = (batch, c.n_kv_head, max_len, c.head_dim)
        # |key|, |value| <= 2^KV_BITS = 2^14: int16 holds them (a quarter of float64's memory)
        z = lambda: torch.zeros(shape, dtype=torch.int16, device=self.device)
        return State(
            [z() for _ in range(c.n_layer)],
            [z() for _ in range(c.n_layer)],
            torch.zeros(batch, dtype=torch.int64),
            max_len,
        )

    def reset_rows(self, state: State, rows, prefix: Prefix | None = None) -> None:
        """Start a new segment in the given rows of `state` (their next step is position 0, fed
        BOS; or, with a `prefix`, position prefix.length, its keys copied in); the other rows
        continue. The old keys need no clearing: a row never attends beyond its own position,
        and those keys get weight exactly 0."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        if prefix is None:
            state.pos[idx] = 0
            return
        L = prefix.length
        if L >= state.max_len:
            raise ValueError(f"prefix of {L} tokens does not fit a cache of {state.max_len}")
        dev = idx.to(self.device)
        for i in range(self.config.n_layer):
            state.k[i][dev, :, :L] = prefix.k[i][0].to(state.k[i].device)
            state.v[i][dev, :, :L] = prefix.v[i][0].to(state.v[i].device)
        state.pos[idx] = L

    @torch.no_grad()
    def step(self, state: State, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,), row b at position state.pos[b] -> int32 (B, V), equal to freqs() at that
        position."""
        if int(state.pos.max()) >= state.max_len:
            raise ValueError("KV cache full")
        self._check(tokens)
        B = tokens.shape[0]
        x = self._embed(tokens.to(self.device).view(-1))  # (B, D)
        qpos = state.pos.to(self.device).view(B, 1)
        kmax = [int(state.pos.max()) + 1]
        for i in range(self.config.n_layer):
            x = self._layer(i, x, B, 1, qpos, kmax, (state.k[i], state.v[i]))
        state.pos += 1
        return self.head(x)


__all__ = [
    "ENGINE_VERSION",
    "Config",
    "Engine",
    "State",
    "Prefix",
    "TorchOps",
    "FusedOps",
    "prepare_weights",
    "quantize_weight",
    "calibrate",
]
