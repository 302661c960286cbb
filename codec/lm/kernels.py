"""Build and load kernels.c, the fused CPU loops of the exact engine, with the system C compiler.

The engine's elementwise steps were ~10 torch ops each, i.e. ~10 passes over large float64 tensors
(the LM head alone: ~14 passes over 50 M values per 1024 tokens). kernels.c computes the same IEEE
operations in the same order in one or two passes. Built with -ffp-contract=off and without
-ffast-math, the results are bit-identical to the torch ops (tests/test_engine.py compares them), so
the CUDA path and machines without a compiler keep using the torch form and agree with this one.

Plain C through ctypes instead of a torch C++ extension: it compiles in ~0.3 s instead of ~40 s
(no torch headers), needs no ninja, and ctypes releases the GIL during each call.

The shared object is cached under $LLMFS_CACHE/../kernels (default ~/.cache/llmfs/kernels), named
by a hash of the source, the flags, the compiler's version and the machine; it is written to a
temporary name and renamed, so concurrent first uses in several processes are safe.

`lib()` returns None when no working compiler is found; the engine then uses the torch form.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels.c")
# No -march: the cache may be shared between machines. -O3 vectorises the loops with the baseline
# ISA, and the hot functions carry an AVX2 clone too (gcc target_clones: an ifunc picks one when the
# library loads); -ffp-contract=off forbids FMA contraction (it would change rounding, see kernels.c).
# The attention kernels also have AVX-512 VNNI forms, and head_freqs, swiglu_quant, rmsnorm_quant and
# quant_rows AVX-512 forms (target attributes, chosen at run time by __builtin_cpu_supports), with
# the same results as the portable ones.
CFLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_i64, _p = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "quant_rows": [_p, _i64, _i64, _p, _p, ctypes.c_int, _i64],
    "rmsnorm_quant": [_p, _i64, _i64, _p, ctypes.c_double, _p, _p, ctypes.c_int, _i64],
    "combine": [_p, _i64, _i64, _p, _p, _p, ctypes.c_int, ctypes.c_int],
    "swiglu_quant": [_p, _i64, _i64, _p, _p, _p, _p, _p, ctypes.c_int, _i64],
    "qkv_post": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _p, _p, ctypes.c_double,
                 ctypes.c_double, ctypes.c_double, _p, _p, _p, _p],
    "softmax_weights": [_p, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _p],
    "attn_out": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _i64],
    "split_kv": [_p, _p, _i64, _i64, _i64, _p, _p],
    "softmax_digits": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _p, _p],
    "attn_out_digits": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _i64],
    "attend_step": [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _p, _i64],
    "kv_store": [_p, _p, _i64, _i64, _i64, _p, _i64, _p, _p],
    "gemm_packed": [_p, _i64, _i64, _p, _i64, _p],
    "attend_fwd": [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _p],
    "head_freqs": [_p, _i64, _i64, _p, _p, _p, _i64, _i64, _p, _i64],
}

# functions that return something: attend_step returns the form that ran (1 portable, 2 VNNI)
# attend_fwd returns 2 when it ran, 0 when the CPU or shape needs the digit form; head_freqs,
# quant_rows, rmsnorm_quant and swiglu_quant take impl like attend_step and return the form that ran
_RESTYPES = {"gemm_packed": ctypes.c_int, "attend_step": ctypes.c_int, "attend_fwd": ctypes.c_int,
             "head_freqs": ctypes.c_int, "quant_rows": ctypes.c_int, "rmsnorm_quant": ctypes.c_int,
             "swiglu_quant": ctypes.c_int}


def cache_dir() -> Path:
    base = os.environ.get("LLMFS_CACHE")
    return (Path(base).expanduser().parent if base else Path("~/.cache/llmfs").expanduser()) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(defines: tuple[str, ...] = ()) -> Path:
    """Compile kernels.c (or find it compiled) and return the shared object's path. defines: extra
    -D flags (tests: -DLLMFS_NO_CLONES baseline ISA only, -DLLMFS_NO_VNNI no AVX-512 kernels)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    src = _SOURCE.read_bytes()
    flags = CFLAGS + [f"-D{d}" for d in defines]
    key = hashlib.blake2b(src + "\0".join(flags + [version, platform.machine()]).encode(),
                          digest_size=12).hexdigest()
    out = cache_dir() / f"kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def load(path: Path) -> ctypes.CDLL:
    """Load a built kernels library and declare its functions' signatures."""
    so = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(so, name)
        fn.argtypes, fn.restype = args, _RESTYPES.get(name)
    return so


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, or None (and one warning) when they cannot be built here."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = load(build())
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or e
                log.warning("fused CPU kernels unavailable, using torch ops (slower): %s", detail)
        return _lib


__all__ = ["lib", "load", "build", "cache_dir", "CFLAGS"]
