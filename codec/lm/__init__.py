"""codec.lm — the language-model codec (issue 3).

    tokenizer.py  lossless bytes <-> token ids (byte-level BPE with escapes; plain bytes for tests)
    coder.py      range coding of token ids with the engine's integer frequency rows
    codec.py      LMCodec: segments, payload format, batched encode/decode (the registry's ModelCodec)
    engine.py     the exact integer inference engine;  loader.py  model specs -> engine + tokenizer
    reference.py  float32 cross-entropy, the floor the bench compares against

`load` and `open_codec` import the engine and loader only when called, so the tokenizer and coder can
be used (and tested) without them.
"""
from __future__ import annotations

from .codec import DECODE_BATCH, PAYLOAD_VERSION, SEGMENT_TOKENS, LMCodec
from .tokenizer import ByteLevelBPE, ByteTokenizer, UnsupportedTokenizer

DEFAULT_DEVICE = "cpu"


# Spec of the built-in test model: Engine.tiny(seed) with the byte tokenizer ("tiny" = "tiny:0").
# Random weights, so it compresses nothing; it exists so that the CLI can be tested in seconds.
TINY_SPEC = "tiny"


def load(spec: str | None = None, cache_dir=None):
    """loader.load: a model spec (None = the default model) -> LoadedModel."""
    from .loader import load as _load
    return _load(spec, cache_dir=cache_dir)


def _tiny_seed(spec: str | None) -> int | None:
    if spec == TINY_SPEC:
        return 0
    if spec and spec.startswith(TINY_SPEC + ":") and spec[len(TINY_SPEC) + 1:].isdigit():
        return int(spec[len(TINY_SPEC) + 1:])
    return None


def resolve_device(device: str | None) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    import torch
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return device


def open_codec(spec: str | None = None, batch: int = DECODE_BATCH, threads: int | None = None,
               device: str | None = DEFAULT_DEVICE, segment_tokens: int = SEGMENT_TOKENS) -> LMCodec:
    """Load a model and wrap it in an LMCodec, on `device` ('cpu', 'cuda' or 'auto')."""
    seed = _tiny_seed(spec)
    if seed is not None:
        from .engine import Engine
        engine, tokenizer = Engine.tiny(seed=seed), ByteTokenizer()
    else:
        loaded = load(spec)
        engine, tokenizer = loaded.engine, _tokenizer_of(loaded)
    dev = resolve_device(device)
    if str(getattr(engine, "device", "cpu")) != dev:
        if not hasattr(engine, "to"):
            raise RuntimeError(f"this engine cannot move to device {dev!r}")
        moved = engine.to(dev)
        if moved is not None:
            engine = moved
    return LMCodec((engine, tokenizer), batch=batch, threads=threads,
                   segment_tokens=segment_tokens)


def _tokenizer_of(loaded):
    from .tokenizer import from_json
    return from_json(getattr(loaded, "tokenizer_json", None))


__all__ = ["LMCodec", "load", "open_codec", "TINY_SPEC", "resolve_device", "ByteTokenizer", "ByteLevelBPE",
           "UnsupportedTokenizer", "PAYLOAD_VERSION", "SEGMENT_TOKENS"]
