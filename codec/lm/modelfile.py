"""The model file: an engine-ready model as one self-contained, content-addressed byte string.

Everything decoding an LM block needs that is not code — the engine's integer weights and scales,
its Config, and the tokenizer in the canonical form of tokenizer.py — in a format of our own, so
that a store can hold its models (llmfs/store.py `modelfiles`) and decode its blocks whatever
transformers, tokenizers, gguf or ~/.cache hold on the machine that reads it.

Layout (format version FORMAT = 1; integers big-endian):

    8      magic b"LLMFSMDL"
    4      u32 format version
    8      u64 manifest length M
    M      manifest: canonical JSON (sorted keys, no whitespace, ASCII) of
             {"format": 1, "engine_version": int, "config": Config fields,
              "engine_fingerprint": hex of Engine.fingerprint (16 bytes),
              "fingerprint": hex of the codec fingerprint (container.FINGERPRINT_SIZE bytes),
              "aliases": [hex codec fingerprints older releases gave this same model],
              "tokenizer": the canonical tokenizer (tokenizer.canonical_*),
              "tensors": [[name, dtype, shape, offset, nbytes], ...] in name order,
              "written_by": "llmfs X.Y.Z" (the release that converted it: named in messages)}
    ...    zero padding to a multiple of 64, then each tensor's little-endian bytes at its offset
           (relative to the start of the data area, each a multiple of 64), in manifest order

The content address of a model file is blake3 of all its bytes (`digest`). A reader checks it
before it trusts anything inside (`parse(blob, digest)`), and checks that the engine built from it
has the fingerprints the manifest names: a model file decodes exactly the blocks whose container
fingerprint is `fingerprint` or one of `aliases`.

Invariants:
  * a model file is a pure function of the model's integers, its canonical tokenizer, the engine
    version, the release that wrote it and its aliases (older fingerprints, computed from the
    source's tokenizer JSON text): no paths, times or host names, so converting the same source
    twice with one release gives the same bytes;
  * the manifest's engine_version names the arithmetic (engines.py) that produced the
    frequencies; a reader that lacks that version refuses (engines.UnsupportedEngine), never
    guesses.

Threading: pure functions; a parsed ModelFile is immutable.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import blake3
import numpy as np

MAGIC = b"LLMFSMDL"
FORMAT = 1
_HEAD = struct.Struct(">8sIQ")
_ALIGN = 64
_DTYPES = {
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "float32": np.float32,
    "float64": np.float64,
    "uint8": np.uint8,
}


class BadModelFile(Exception):
    """A model file is truncated, corrupt, or not the one its hash names."""


def canonical_json(obj) -> bytes:
    """The one serialisation of `obj` (sorted keys, no whitespace, ASCII escapes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def digest(blob) -> bytes:
    """The content address of a model file: blake3 of its bytes (32 bytes)."""
    return blake3.blake3(blob, max_threads=blake3.blake3.AUTO).digest()


@dataclass(frozen=True)
class ModelFile:
    manifest: dict
    tensors: dict  # name -> torch.Tensor (CPU; views into `blob`)
    digest: bytes
    blob: object  # the file's bytes (a writable buffer)

    @property
    def engine_version(self) -> int:
        return int(self.manifest["engine_version"])

    @property
    def fingerprint(self) -> bytes:
        return bytes.fromhex(self.manifest["fingerprint"])

    @property
    def fingerprints(self) -> frozenset[bytes]:
        """Every container fingerprint this model decodes: its own and older releases'."""
        return frozenset([self.fingerprint] + [bytes.fromhex(a) for a in self.manifest["aliases"]])


def build(manifest: dict, tensors: dict) -> bytes:
    """Serialise: `manifest` without "tensors" (added here) and name -> CPU tensor."""
    import torch

    arrays, table, offset = [], [], 0
    for name in sorted(tensors):
        t = tensors[name]
        a = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
        dt = a.dtype.name
        if dt not in _DTYPES:
            raise ValueError(f"tensor {name}: dtype {dt} has no place in a model file")
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        table.append([name, dt, list(a.shape), offset, len(raw)])
        arrays.append(raw)
        offset += -(-len(raw) // _ALIGN) * _ALIGN
    m = canonical_json(dict(manifest, format=FORMAT, tensors=table))
    head = _HEAD.pack(MAGIC, FORMAT, len(m)) + m
    out = bytearray(head + bytes(-len(head) % _ALIGN))
    for raw in arrays:
        out += raw + bytes(-len(raw) % _ALIGN)
    return bytes(out)


def read_manifest(prefix) -> dict:
    """The manifest from the first bytes of a model file (enough to hold it), without the
    tensors and without checking the hash: for reports (fsck, stat, the mount's version check)."""
    prefix = memoryview(prefix)
    if len(prefix) < _HEAD.size or bytes(prefix[:8]) != MAGIC:
        raise BadModelFile("not an llmfs model file (bad magic)")
    _magic, version, n = _HEAD.unpack_from(prefix, 0)
    if version != FORMAT:
        raise BadModelFile(
            f"model file format {version} is unknown to this llmfs (it reads "
            f"format {FORMAT}); install a newer llmfs"
        )
    if len(prefix) < _HEAD.size + n:
        raise BadModelFile("model file truncated inside its manifest")
    try:
        return json.loads(bytes(prefix[_HEAD.size : _HEAD.size + n]))
    except ValueError:
        raise BadModelFile("model file manifest is not JSON") from None


def manifest_size(prefix) -> int:
    """Bytes from the start of a model file to the end of its manifest."""
    _magic, _version, n = _HEAD.unpack_from(memoryview(prefix), 0)
    return _HEAD.size + n


def parse(blob, want_digest: bytes | None = None) -> ModelFile:
    """A verified ModelFile. `blob` should be a writable buffer (a bytearray or a memoryview of
    one): the tensors are views into it, not copies. With want_digest, the bytes must hash to it (BadModelFile otherwise)."""
    import torch

    got = digest(blob)
    if want_digest is not None and got != want_digest:
        raise BadModelFile(
            f"model file {want_digest.hex()[:16]} does not match its hash "
            f"(it hashes to {got.hex()[:16]}): corrupt"
        )
    manifest = read_manifest(blob)
    base = -(-manifest_size(blob) // _ALIGN) * _ALIGN
    tensors = {}
    writable = isinstance(blob, bytearray) or (isinstance(blob, memoryview) and not blob.readonly)
    buf = blob if writable else bytearray(blob)
    try:
        for name, dt, shape, offset, nbytes in manifest.pop("tensors"):
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            np_dt = np.dtype(_DTYPES[dt])
            if count * np_dt.itemsize != nbytes or base + offset + nbytes > len(buf):
                raise BadModelFile(f"model file tensor {name} lies outside the file")
            t = torch.frombuffer(buf, dtype=getattr(torch, dt), count=count, offset=base + offset)
            tensors[name] = t.view(*shape) if shape else t.view(())
    except (KeyError, TypeError, ValueError) as e:
        raise BadModelFile(f"model file manifest is malformed ({e})") from None
    return ModelFile(manifest, tensors, got, buf)


__all__ = [
    "ModelFile",
    "BadModelFile",
    "build",
    "parse",
    "read_manifest",
    "digest",
    "canonical_json",
    "FORMAT",
]
