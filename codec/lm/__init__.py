"""codec.lm — the language-model codec (issue 3).

    tokenizer.py  lossless bytes <-> token ids (byte-level BPE with escapes; plain bytes for tests)
    coder.py      range coding of token ids with the engine's integer frequency rows
    codec.py      LMCodec: segments, payload format, batched encode/decode (the registry's ModelCodec)
    engine.py     the exact integer inference engine;  engines.py  the engine versions this release runs
    modelfile.py  the model file: an engine-ready model in our own content-addressed format
    loader.py     model specs -> model file (converted once, cached) -> engine + tokenizer
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
    from .loader import model_file
    return codec_of(model_file(spec), batch=batch, threads=threads, device=device,
                    segment_tokens=segment_tokens, source=spec or "")


def codec_of(mf, batch: int = DECODE_BATCH, threads: int | None = None,
             device: str | None = DEFAULT_DEVICE, segment_tokens: int = SEGMENT_TOKENS,
             source: str = "") -> LMCodec:
    """The LMCodec of a verified model file (modelfile.ModelFile). Its `fingerprints` are every
    container fingerprint it decodes (its own and the aliases older releases gave the model);
    `model_file` is the file, for stores that embed it."""
    from .loader import from_model_file
    dev = resolve_device(device)
    loaded = from_model_file(mf, source, dev)
    codec = LMCodec((loaded.engine, loaded.tokenizer), batch=batch, threads=threads,
                    segment_tokens=segment_tokens)
    if codec.fingerprint != mf.fingerprint:
        raise RuntimeError(f"codec fingerprint {codec.fingerprint.hex()} differs from its model "
                           f"file's {mf.fingerprint.hex()}")
    codec.fingerprints = mf.fingerprints
    codec.model_file = mf
    return codec


__all__ = ["LMCodec", "load", "open_codec", "codec_of", "TINY_SPEC", "resolve_device", "ByteTokenizer", "ByteLevelBPE",
           "UnsupportedTokenizer", "PAYLOAD_VERSION", "SEGMENT_TOKENS"]
