"""Float32 reference: the cross-entropy the model's own (dequantised, otherwise unquantised) weights give,
evaluated by transformers' Llama implementation — an independent check of the exact engine and the
floor its compression is measured against (it should stay within 1 %).

Not used for coding (float inference is not reproducible across batch layouts); benchmark only.
Threading: loads its own model; not meant to be shared between threads.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch

from .loader import LoadedModel, resolve


@functools.lru_cache(maxsize=2)
def _model(path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if p.is_dir():
        m = AutoModelForCausalLM.from_pretrained(str(p), torch_dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, torch_dtype=torch.float32)
    return m.eval()


@torch.no_grad()
def cross_entropy_bits(loaded_or_spec: LoadedModel | str | None, segments: list[list[int]]) -> float:
    """Total bits to code every token after the first of each segment (segment[0] is the BOS
    context), under the float32 model: sum of -log2 p(token | prefix)."""
    path = loaded_or_spec.source if isinstance(loaded_or_spec, LoadedModel) else str(resolve(loaded_or_spec))
    model = _model(path)
    total = 0.0
    for seg in segments:
        if len(seg) < 2:
            continue
        ids = torch.tensor([seg])
        logits = model(ids).logits[0, :-1].double()  # (T-1, V)
        logp = torch.log_softmax(logits, dim=-1)
        total -= logp.gather(-1, ids[0, 1:, None]).sum().item() / math.log(2)
    return total


def exact_bits(engine, segments: list[list[int]]) -> float:
    """Bits the exact engine's integer frequency tables cost for the same segments."""
    total = 0.0
    for seg in segments:
        if len(seg) < 2:
            continue
        ids = torch.tensor([seg])
        f = engine.freqs(ids)[0, :-1].double()  # (T-1, V)
        p = f.gather(-1, ids[0, 1:, None].to(f.device))[:, 0] / f.sum(-1)
        total -= torch.log2(p).sum().item()
    return total


__all__ = ["cross_entropy_bits", "exact_bits"]
