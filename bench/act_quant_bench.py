"""Bits/token cost of int8 vs int16 linear-layer activations, per layer type, with and without
SmoothQuant-style power-of-two per-input-channel factors (engine v4 otherwise: attention, tables and
the LM head's frequencies are the engine's own ops).

    .venv/bin/python bench/act_quant_bench.py [--segments 2] [--alpha 0.5] CONFIG ...

CONFIG: comma list of type=mode with type in qkv, wo, gu, down, head and mode 16, 8 or 8s (int8 after
smoothing); unnamed types stay 16. E.g. `base`, `qkv=8`, `gu=8s,down=8s`.

int8 is emulated inside the stacked hi/lo form (hi = the int8 value, lo = 0, scale / 128): the same
values as a single int8 pass. Smoothing: calibrate max |input channel| on text that is not measured
(CALIB files), c = 2^round(alpha log2 max|x_k| - (1 - alpha) log2 max|W_k|), input / c, weight
columns * c, weights re-quantised from the float weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmfs.codec.lm import engine as E  # noqa: E402
from llmfs.codec.lm import loader, reference
from llmfs.codec.lm.engine import SIG_RANGE, SIG_RES_BITS, Engine, TorchOps, _mm, det_sqrt, prepare_weights  # noqa: E402

FILES = ["/usr/share/common-licenses/GPL-3", "/usr/lib/python3.11/argparse.py"]
CALIB = ["/usr/share/common-licenses/Apache-2.0", "/usr/lib/python3.11/subprocess.py"]
TYPES = ["qkv", "wo", "gu", "down", "head"]
WNAME = {"qkv": "qkv", "wo": "wo", "gu": "gate_up", "down": "down"}


def q16(x):
    return TorchOps().quant_rows(x)


def q8(x):
    m = x.abs().amax(dim=1, keepdim=True)
    s = torch.where(m > 0, m / 127.0, torch.ones_like(m))
    xq = torch.round(x / s)
    return torch.cat([xq, torch.zeros_like(xq)]).to(torch.int8), s / 128


def rms(x, eps):
    m = x.abs().amax(dim=-1, keepdim=True)
    sr = torch.where(m > 0, m / 2**20, torch.ones_like(m))
    xi = torch.round(x / sr)
    d = (xi * xi).sum(dim=-1, keepdim=True) / x.shape[-1] * sr * sr + eps
    return det_sqrt(d)


class XEngine(Engine):
    def __init__(self, config, tensors, modes, smooth):
        super().__init__(config, tensors)
        self.modes, self.smooth, self.stats = modes, smooth, None

    def _quant(self, x, i, typ, r=None):
        """quantise x (/ r per row, folded into the scale as the engine's rmsnorm_quant does)"""
        if self.stats is not None:
            k = (i, typ)
            mx = (x if r is None else x / r).abs().amax(dim=0)
            self.stats[k] = torch.maximum(self.stats[k], mx) if k in self.stats else mx
        mode = self.modes.get(typ, "16")
        if mode in ("8s", "8w"):
            x = x / self.smooth[(i, typ, mode)]
        q, s = q8(x) if mode.startswith("8") else q16(x)
        return (q, s) if r is None else (q, s / r)

    def _w(self, i, typ):
        t = self._t
        mode = self.modes.get(typ)
        if mode in ("8s", "8w"):
            return t[f"sm.{i}.{typ}.{mode}.q"], t[f"sm.{i}.{typ}.{mode}.s"]
        n = "tok_emb" if typ == "head" else f"l{i}.{WNAME[typ]}"
        return t[n + ".q"], t[n + ".s"]

    def _lin(self, xq, s, i, typ, residual=None):
        q, ws = self._w(i, typ)
        return self._ops.combine(_mm(xq, q), ws, s, residual=residual)

    def _layer(self, i, x, B, T, qpos, kmax, cache):
        c, t, p = self.config, self._t, f"l{i}."
        r = rms(x, c.norm_eps)
        hq, s = self._quant(x * t[p + "attn_norm"], i, "qkv", r)
        h = self._lin(hq, s, i, "qkv")
        qi, f, ki, vi = self._qkv(i, h, B, T, qpos)
        keys, values = ki, vi
        a = torch.empty(B, T, c.n_head * c.head_dim, dtype=torch.float64)
        self._attend(i, qi, f, keys, values, qpos, kmax, a)
        aq, s = self._quant(a.view(B * T, -1), i, "wo")
        x = self._lin(aq, s, i, "wo", residual=x)
        r = rms(x, c.norm_eps)
        hq, s = self._quant(x * t[p + "ffn_norm"], i, "gu", r)
        y = self._lin(hq, s, i, "gu")
        gate, up = y.chunk(2, dim=-1)
        j = (gate.clamp(-SIG_RANGE, SIG_RANGE) + SIG_RANGE).mul_(2**SIG_RES_BITS).round_().long()
        mq, s = self._quant(gate * self._sig[j] * up, i, "down")
        return self._lin(mq, s, i, "down", residual=x)

    def head(self, x, out=None):
        c, t = self.config, self._t
        if out is None:
            out = torch.empty(x.shape[0], c.vocab_size, dtype=torch.int32)
        budget = 2**E.FREQ_TOTAL_BITS - c.vocab_size
        q, ws = self._w(0, "head")
        hs = ws * 2.0**E.LOGIT_RES_BITS
        for r0 in range(0, x.shape[0], E.HEAD_ROWS):
            xr = x[r0 : r0 + E.HEAD_ROWS]
            hq, s = self._quant(xr * t["norm"], 0, "head", rms(xr, c.norm_eps))
            self._ops.head_freqs(_mm(hq, q), hs, s, self._lexp, budget, out[r0 : r0 + E.HEAD_ROWS])
        return out


def pow2_round(v):
    return np.ldexp(1.0, np.round(np.log2(v)).astype(np.int64))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--segments", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    got = {}
    orig = loader.prepare_weights
    loader.prepare_weights = lambda cfg, f, *rest: (got.setdefault("f", f), orig(cfg, f, *rest))[1]
    path = loader.resolve(None)
    config, _, tok_json = loader.convert(path)
    f = got["f"]
    tensors = prepare_weights(config, f)  # unsmoothed: this script smooths its own way
    from tokenizers import Tokenizer

    from bench.engine_bench import segments_of

    tok = Tokenizer.from_str(tok_json)
    segs = {p: segments_of(tok, config.bos_id, p, 1024, a.segments) for p in FILES}
    m = loader.LoadedModel(Engine(config, tensors), tok_json, str(path))
    floor = {p: reference.cross_entropy_bits(m, s) for p, s in segs.items()}

    smooth, extra = {}, {}
    if any("8s" in c or "8w" in c for c in a.configs):
        xe = XEngine(config, tensors, {}, {})
        xe.stats = {}
        for p in CALIB:
            xe.freqs(torch.tensor(segments_of(tok, config.bos_id, p, 1024, 1)[:1]))
        for (i, typ), mx in xe.stats.items():
            if typ == "head":
                w = np.asarray(f["tok_emb"], dtype=np.float64)
            elif typ == "qkv":
                w = np.concatenate([f[f"l{i}.w{n}"] for n in "qkv"]).astype(np.float64)
            elif typ == "gu":
                w = np.concatenate([f[f"l{i}.w_gate"], f[f"l{i}.w_up"]]).astype(np.float64)
            else:
                w = np.asarray(f[f"l{i}.{'wo' if typ == 'wo' else 'w_down'}"], dtype=np.float64)
            mw = np.abs(w).max(axis=0) + 1e-12
            mxn = mx.numpy() + 1e-12
            # 8w: weights only, the norm weight standing in for the input's channel maxima
            nw = {"qkv": f"l{i}.attn_norm", "gu": f"l{i}.ffn_norm", "head": "norm"}.get(typ)
            proxy = None if nw is None else np.abs(np.asarray(f[nw], dtype=np.float64)) + 1e-12
            for mode, mxv in (("8s", mxn), ("8w", proxy)):
                if mxv is None:
                    continue
                c = pow2_round(mxv**a.alpha / mw ** (1 - a.alpha))
                smooth[(i, typ, mode)] = torch.from_numpy(c)
                qw, sw = E.quantize_weight(w * c[None, :])
                extra[f"sm.{i}.{typ}.{mode}.q"] = torch.from_numpy(qw)
                extra[f"sm.{i}.{typ}.{mode}.s"] = torch.from_numpy(sw)
    print(f"{'config':28s} " + "  ".join(f"{os.path.basename(p):>22s}" for p in FILES), flush=True)
    for cfg in a.configs:
        modes = {} if cfg == "base" else dict(kv.split("=") for kv in cfg.split(","))
        xe = XEngine(config, {**tensors, **extra}, modes, smooth)
        cols = []
        for p, s in segs.items():
            b = reference.exact_bits(xe, s)
            n = sum(len(x) - 1 for x in s)
            cols.append(f"{b / n:.4f} {(b / floor[p] - 1) * 100:+.2f} %")
        print(f"{cfg:28s} " + "  ".join(f"{c:>22s}" for c in cols), flush=True)
    print("float32 " + "  ".join(f"{floor[p] / sum(len(x) - 1 for x in s):.4f}" for p, s in segs.items()))


if __name__ == "__main__":
    main()
