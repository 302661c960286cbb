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
`lib("noavx512")` is the build without any AVX-512 code (-DLLMFS_NO_AVX512): what an AVX2-only CPU
runs, loaded by the avx2/blas/intmm backends (codec/lm/backend.py) so that a VNNI machine runs
their paths too.

Trust: the cache is a directory of code this process will run. A cached object is loaded only if
it and its directory belong to this process's effective user and neither is group- or
world-writable (checked on the open file descriptor, which is what gets loaded, so a swap after the
check cannot substitute another file); otherwise, e.g. `sudo -E llmfs mount` with the invoking
user's ~/.cache, the kernels are compiled into a fresh private directory instead (and a warning
says why). The cache directory is created 0700.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels.c")
# No -march: the cache may be shared between machines. -O3 vectorises the loops with the baseline
# ISA, and the hot functions carry an AVX2 clone too (gcc target_clones: an ifunc picks one when the
# library loads); -ffp-contract=off forbids FMA contraction (it would change rounding, see kernels.c).
# The attention kernels also have AVX-512 VNNI forms (attend_fwd an AVX2 one too), and head_freqs, swiglu_quant, rmsnorm_quant and
# quant_rows AVX-512 forms (target attributes, chosen at run time by __builtin_cpu_supports), with
# the same results as the portable ones.
CFLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-fast-math"]

_lock = threading.Lock()
# build variant -> the loaded library (None: it could not be built here)
VARIANTS = {"full": (), "noavx512": ("LLMFS_NO_AVX512",)}
_libs: dict[str, ctypes.CDLL | None] = {}
_private: Path | None = None  # a private build directory, when the cache is not trustworthy

_i64, _p = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "quant_rows": [_p, _i64, _i64, _p, _p, ctypes.c_int, _i64],
    "rmsnorm_quant": [_p, _i64, _i64, _p, ctypes.c_double, _p, _p, ctypes.c_int, _i64],
    "combine": [_p, _i64, _i64, _p, _p, _p, ctypes.c_int, ctypes.c_int],
    "swiglu_quant": [_p, _i64, _i64, _p, _p, _p, _p, _p, ctypes.c_int, _i64],
    "qkv_post": [
        _p,
        _i64,
        _i64,
        _i64,
        _i64,
        _i64,
        _p,
        _p,
        _p,
        _p,
        _p,
        _p,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        _p,
        _p,
        _p,
        _p,
    ],
    "softmax_weights": [_p, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _p],
    "attn_out": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _i64],
    "split_kv": [_p, _p, _i64, _i64, _i64, _p, _p],
    "softmax_digits": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _p, _p],
    "attn_out_digits": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _i64],
    "attend_step": [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _p, _i64, _i64, _i64],
    "kv_store": [_p, _p, _i64, _i64, _i64, _p, _i64, _p, _p],
    "gemm_packed": [_p, _i64, _i64, _p, _i64, _p, _i64, _i64],
    "gemm_packed16": [_p, _i64, _i64, _p, _i64, _p, _i64],
    "attend_fwd": [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _p, _i64, _i64],
    "head_freqs": [_p, _i64, _i64, _p, _p, _p, _i64, _i64, _p, _i64],
}

# functions that return something: attend_step returns the form that ran (1 portable, 2 VNNI,
# 3 AVX2);
# gemm_packed the form that ran (2 VNNI, 3 AVX2) or 0 when none could, gemm_packed16 3 or 0
# attend_fwd the form that ran (2 VNNI, 3 AVX2) or 0 when the CPU or shape needs another; head_freqs,
# quant_rows, rmsnorm_quant and swiglu_quant take impl like attend_step and return the form that ran
_RESTYPES = {
    "gemm_packed": ctypes.c_int,
    "gemm_packed16": ctypes.c_int,
    "attend_step": ctypes.c_int,
    "attend_fwd": ctypes.c_int,
    "head_freqs": ctypes.c_int,
    "quant_rows": ctypes.c_int,
    "rmsnorm_quant": ctypes.c_int,
    "swiglu_quant": ctypes.c_int,
}


def cache_dir() -> Path:
    base = os.environ.get("LLMFS_CACHE")
    return (Path(base).expanduser().parent if base else Path("~/.cache/llmfs").expanduser()) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _untrusted(st: os.stat_result, what: str) -> str | None:
    """Why a cached file or directory must not be trusted (None: it may be)."""
    if st.st_uid != os.geteuid():
        return f"{what} is owned by uid {st.st_uid}, not by this process's uid {os.geteuid()}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _check_dir(d: Path) -> str | None:
    try:
        st = os.stat(d)
    except OSError as e:
        return f"{d}: {e.strerror}"
    return _untrusted(st, str(d)) if stat.S_ISDIR(st.st_mode) else f"{d} is not a directory"


def _build_dir() -> Path:
    """The cache directory if it may hold code this process runs, else a private one (made once per
    process, 0700, removed at exit)."""
    global _private
    d = cache_dir()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass
    why = _check_dir(d)
    if why is None:
        return d
    if _private is None:
        import atexit

        _private = Path(tempfile.mkdtemp(prefix="llmfs-kernels-"))
        atexit.register(shutil.rmtree, _private, True)
        log.warning("not using the kernels cache: %s; compiling into %s", why, _private)
    return _private


def build(defines: tuple[str, ...] = ()) -> Path:
    """Compile kernels.c (or find it compiled) and return the shared object's path. defines: extra
    -D flags (tests: -DLLMFS_NO_CLONES baseline ISA only, -DLLMFS_NO_VNNI no AVX-512 kernels,
    -DLLMFS_NO_AVX512 no AVX-512 code at all)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    src = _SOURCE.read_bytes()
    flags = CFLAGS + [f"-D{d}" for d in defines]
    key = hashlib.blake2b(
        src + "\0".join(flags + [version, platform.machine()]).encode(), digest_size=12
    ).hexdigest()
    d = _build_dir()
    out = d / f"kernels-{key}.so"
    if out.exists() and _untrusted(os.lstat(out), str(out)) is None and out.is_file():
        return out
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run(
            [cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], check=True, capture_output=True, text=True
        )
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def build_key(path: Path) -> str:
    """The build's identity (source, flags, compiler, machine): the hash in its file name."""
    return path.stem.removeprefix("kernels-")


def load(path: Path) -> ctypes.CDLL:
    """Load a built kernels library and declare its functions' signatures. The file and its
    directory must belong to this process's effective user and not be group/world-writable
    (RuntimeError otherwise); what is loaded is the descriptor that was checked."""
    why = _check_dir(path.parent)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        why = why or _untrusted(st, str(path))
        if why is None and not stat.S_ISREG(st.st_mode):
            why = f"{path} is not a regular file"
        if why is not None:
            raise RuntimeError(f"refusing to load {path}: {why}")
        proc = f"/proc/self/fd/{fd}"
        so = ctypes.CDLL(proc if os.path.exists(proc) else str(path))
    except BaseException:
        os.close(fd)
        raise
    # The descriptor stays open while the library is loaded: the dynamic loader knows the library
    # by the name /proc/self/fd/N, and a later load through a reused N would be given this one.
    so._llmfs_fd, so._llmfs_path = fd, path
    for name, args in _SIGNATURES.items():
        fn = getattr(so, name)
        fn.argtypes, fn.restype = args, _RESTYPES.get(name)
    return so


def lib(variant: str = "full") -> ctypes.CDLL | None:
    """The loaded kernels, or None (and one warning) when they cannot be built here. variant: a key
    of VARIANTS ("noavx512": the build without AVX-512 code)."""
    with _lock:
        if variant not in _libs:
            _libs[variant] = None
            try:
                _libs[variant] = load(build(VARIANTS[variant]))
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or e
                log.warning("fused CPU kernels unavailable, using torch ops (slower): %s", detail)
        return _libs[variant]


__all__ = ["lib", "load", "build", "build_key", "cache_dir", "CFLAGS", "VARIANTS"]
