"""`llmfs compress` / `llmfs decompress`: the standalone, xz-like face of the codec.

Standalone file format (version 1; integers big-endian). This docstring is its one definition.

    offset  size  field
    0       4     magic b"LMFS"
    4       1     file format version (FILE_VERSION)
    5       1     flags, reserved: 0
    6       2     n = length of the model spec
    8       n     model spec, UTF-8 (e.g. "smollm2-135m"): which model `decompress` loads
    8+n     ...   frames: u32 container length L (L > 0), then one container (codec/container.py)
                  holding the next chunk of input (CHUNK_SIZE bytes, the last one shorter)
    ...     4     u32 0: end of frames
            8     u64 total plaintext length
            8     u64 number of frames

Invariants:
  * every chunk is an independent container (raw, zstd or LM, whichever is smallest), so files stream
    in both directions with memory bounded by a few chunks;
  * the plaintext is the concatenation of the chunks; each container checks its own length and
    checksum; the trailer checks that no frame was lost — a file cut at a frame boundary is an error;
  * nothing may follow the trailer;
  * LM containers carry the model fingerprint; decompress loads the spec from the header (or -m) and
    refuses, with ModelMismatch, a model whose fingerprint differs. A file without LM chunks
    (binary input) decompresses without loading any model.

Threading: one thread drives everything; the engine uses torch's intra-op threads (--threads).
Errors: any bad input ends the command with one line on stderr and exit status 1; when OUT is a file,
it is written under a temporary name and only renamed into place after everything verified.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile

from .container import BadMagic, ContainerError, ModelMismatch, Truncated, UnsupportedVersion
from .progress import Progress
from .registry import LM, ZSTD, Registry

FILE_MAGIC = b"LMFS"
FILE_VERSION = 1
_HEAD = struct.Struct(">4sBBH")
_FRAME = struct.Struct(">I")
_TRAILER = struct.Struct(">QQ")

# Input per container. 256 KiB ≈ 55 segments of 1023 SmolLM2 tokens: enough rows to fill decode
# batches of 16 several times over, while the last, partly filled segment of each chunk (which
# starts without context) costs < 1 % and memory stays at a few MB of plaintext per chunk.
CHUNK_SIZE = 256 * 1024
# Containers decoded together: their segments share engine batches.
DECODE_GROUP = 4
# The standalone tool is xz-like: chunks the model does not help (binary) get zstd's best effort.
# zstd -19 runs at a few MB/s, still far faster than the model on text.
STANDALONE_ZSTD_LEVEL = 19
MAX_CONTAINER = 64 * CHUNK_SIZE  # a frame length beyond this is garbage, not a big chunk


class ToolError(Exception):
    """A user-facing failure: printed as one line."""


def register(subparsers) -> None:
    p = subparsers.add_parser("compress", help="compress a file with the language model (xz-like)")
    p.add_argument("input", metavar="IN", help="input file, - for stdin")
    p.add_argument("output", metavar="OUT", help="output file, - for stdout")
    p.add_argument("-m", "--model", default=None, help="model spec (default: the default model)")
    _engine_options(p)
    p.set_defaults(func=run_compress)

    p = subparsers.add_parser("decompress", help="decompress a file made by `llmfs compress`")
    p.add_argument("input", metavar="IN", help="input file, - for stdin")
    p.add_argument("output", metavar="OUT", help="output file, - for stdout")
    p.add_argument("-m", "--model", default=None, help="model spec to use instead of the one the file names")
    _engine_options(p)
    p.set_defaults(func=run_decompress)


def _engine_options(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--batch",
        type=int,
        default=16,
        help="segments decoded side by side (default 16; the 16 segments that share a "
        "coded stream always get their rows: 23.6 MB of KV cache each for SmolLM2)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="where the model runs (output is identical on every device)",
    )


def run_compress(args) -> int:
    return _guarded(_compress, args)


def run_decompress(args) -> int:
    return _guarded(_decompress, args)


def _guarded(fn, args) -> int:
    try:
        fn(args)
        return 0
    except (ContainerError, ToolError, OSError, RuntimeError, ValueError) as e:
        print(f"llmfs {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # loader errors (UnsupportedModel) and anything unexpected
        if type(e).__name__ != "UnsupportedModel" and getattr(args, "debug", False):
            raise
        print(f"llmfs {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


def _default_spec() -> str:
    from .lm import DEFAULT_MODEL

    return DEFAULT_MODEL


def _open_codec(spec: str, args):
    from .lm import open_codec

    return open_codec(spec, batch=args.batch, threads=args.threads, device=args.device)


# -- compress -----------------------------------------------------------------------------------
def _compress(args) -> None:
    spec = args.model or _default_spec()
    codec = _open_codec(spec, args)
    registry = Registry(zstd_level=STANDALONE_ZSTD_LEVEL)
    registry.add_model(codec)
    spec_bytes = spec.encode()
    with _open_in(args.input) as src, _Output(args.output) as dst, _progress(args.input, "compress") as bar:
        dst.write(_HEAD.pack(FILE_MAGIC, FILE_VERSION, 0, len(spec_bytes)) + spec_bytes)
        total = frames = 0
        while True:
            chunk = _read_full(src, CHUNK_SIZE)
            if not chunk:
                break
            blob = registry.encode(chunk, codecs=(ZSTD, LM), fingerprint=codec.fingerprint)
            dst.write(_FRAME.pack(len(blob)) + blob)
            total += len(chunk)
            frames += 1
            bar.update(len(chunk))
        dst.write(_FRAME.pack(0) + _TRAILER.pack(total, frames))
        dst.commit()


# -- decompress ---------------------------------------------------------------------------------
def _decompress(args) -> None:
    with _open_in(args.input) as src, _Output(args.output) as dst, _progress(args.input, "decompress") as bar:
        head = _read_exact(src, _HEAD.size, "file header")
        magic, version, flags, n = _HEAD.unpack(head)
        if magic != FILE_MAGIC:
            raise BadMagic("not an llmfs compressed file (bad magic)")
        if version != FILE_VERSION or flags:
            raise UnsupportedVersion(
                f"llmfs file format version {version} (flags {flags:#x}) is "
                f"not supported; this llmfs reads version {FILE_VERSION}"
            )
        file_spec = _read_exact(src, n, "model spec").decode("utf-8", "replace")
        spec = args.model or file_spec

        def resolve(fingerprint: bytes):
            codec = _open_codec(spec, args)
            if fingerprint not in getattr(codec, "fingerprints", (codec.fingerprint,)):
                raise ModelMismatch(
                    f"file was compressed with model {file_spec!r} (fingerprint "
                    f"{fingerprint.hex()}), but model {spec!r} here has fingerprint "
                    f"{codec.fingerprint.hex()}: different weights, tokenizer or codec version"
                )
            return codec

        registry = Registry(model_resolver=resolve)
        total = frames = 0
        while True:
            blobs = []
            end = False
            while len(blobs) < DECODE_GROUP:
                (size,) = _FRAME.unpack(_read_exact(src, _FRAME.size, "frame length"))
                if size == 0:
                    end = True
                    break
                if size > MAX_CONTAINER:
                    raise ContainerError(f"corrupt file: frame of {size} bytes")
                blobs.append(_read_exact(src, size, "container"))
            for data in registry.decode_many(blobs):
                dst.write(data)
                total += len(data)
                bar.update(len(data))
            frames += len(blobs)
            if end:
                break
        want_total, want_frames = _TRAILER.unpack(_read_exact(src, _TRAILER.size, "trailer"))
        if (want_total, want_frames) != (total, frames):
            raise ContainerError(
                f"corrupt file: trailer says {want_frames} chunks / {want_total} "
                f"bytes, found {frames} / {total}"
            )
        if src.read(1):
            raise ContainerError("corrupt file: data after the end marker")
        dst.commit()


# -- I/O helpers --------------------------------------------------------------------------------
def _read_full(src, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = src.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_exact(src, n: int, what: str) -> bytes:
    data = _read_full(src, n)
    if len(data) != n:
        raise Truncated(f"file truncated inside the {what} ({len(data)} of {n} bytes)")
    return data


def _open_in(path: str):
    if path == "-":
        return _NoClose(sys.stdin.buffer)
    return open(path, "rb")


class _NoClose:
    def __init__(self, f):
        self.f = f

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Output:
    """stdout, or a temporary file next to OUT that becomes OUT only on commit()."""

    def __init__(self, path: str):
        self.path = path
        self._tmp = None
        if path == "-":
            self.f = sys.stdout.buffer
        else:
            d = os.path.dirname(os.path.abspath(path))
            fd, self._tmp = tempfile.mkstemp(dir=d, prefix=".llmfs-", suffix=".part")
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; OUT gets a normal file's mode
            self.f = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def commit(self) -> None:
        self.f.flush()
        if self._tmp is not None:
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self._tmp, self.path)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._tmp is not None:
            self.f.close()
            os.unlink(self._tmp)
        return False


def _progress(path: str, what: str) -> Progress:
    """A bar over plaintext bytes; compressing a file, its size is the total."""
    size = None
    if path != "-" and what == "compress":
        try:
            size = os.path.getsize(path)
        except OSError:
            pass
    return Progress(what, size)


__all__ = ["register", "run_compress", "run_decompress", "FILE_MAGIC", "FILE_VERSION", "CHUNK_SIZE"]
