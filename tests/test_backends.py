"""The exact GEMM backends (codec/lm/backend.py) give the same int32 results, each forced in turn, at
the int8 extremes and the largest K, on any thread count, in the engine, and on the real model's
weights; the choice is cached and logged; the kernels cache is trusted only when it is ours."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import stat

import pytest
import torch
from llmfs.codec.lm import backend, kernels
from llmfs.codec.lm.engine import Engine

needs_kernels = pytest.mark.skipif(kernels.lib() is None, reason="no C compiler for kernels.c")


def _runnable(form: str) -> None:
    why = backend.unsupported(form)
    if why is not None:
        pytest.skip(f"{form}: {why}")


def _gemm(form: str, a: torch.Tensor, w: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """a (M, K) int8 @ w (N, K).T by one form, as the engine calls it."""
    if form in ("vnni", "avx2"):
        lib = kernels.lib("full" if form == "vnni" else "noavx512")
        out = backend.gemm_packed(lib, form, a, backend.pack_weight(w), w.shape[0], threads)
        assert out is not None
        return out
    if form == "blas":
        return backend.mm_f32(a, backend.f32_weight(w))
    return backend.mm_intmm(a, w)


def _extremes(M: int, K: int, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (M, K), generator=g).to(torch.int8)
    w = torch.randint(-128, 128, (N, K), generator=g).to(torch.int8)
    a[0], w[0] = -128, -128  # the largest sum: 2^14 per product, all positive
    w[-1] = 127
    if M > 1:
        a[-1] = 127
    return a, w


@needs_kernels
@pytest.mark.parametrize("form", backend.FORMS)
@pytest.mark.parametrize(
    "M, K, N",
    [
        (1, 4, 16),
        (2, 576, 1536),
        (7, 1536, 576),
        (65, 64, 80),
        (300, 576, 96),
        (3, 2048, 32),
        (2, 65532, 16),
        (6, 576, 16),
        (17, 1028, 48),
        (4, 1020, 112),
    ],
)
def test_backend_equals_int64_reference(form, M, K, N):
    """Every form against the int64 product: row/column tails (avx2's blocks are 6 rows x 8
    columns: rows 1-5 past the last full block, panels of 16 columns in odd counts), the int8
    extremes, K past one float32 chunk (2048: two chunks of partial sums exactly 2^24 for the -128
    row) and the largest K the packed kernels take (65,532: 255 * 128 * K < 2^31), on 1 and 3
    threads."""
    _runnable(form)
    a, w = _extremes(M, K, N, M * 7 + K + N)
    ref = a.to(torch.int64) @ w.to(torch.int64).t()
    assert int(ref.abs().max()) == 16384 * K  # the -128 row against the -128 column
    for threads in (1, 3):
        out = _gemm(form, a, w, threads)
        assert out.dtype == torch.int32 and torch.equal(out.to(torch.int64), ref), (form, threads)


@needs_kernels
@pytest.mark.parametrize("variant", ["full", "noavx512"])
@pytest.mark.parametrize(
    "M, K, N",
    [
        (1, 4, 16),
        (5, 576, 1536),
        (7, 1536, 576),
        (50, 260, 48),
        (2, 65532, 16),
        (3, 1020, 80),
        (17, 1028, 48),
        (6, 2044, 16),
    ],
)
def test_int16_pass_equals_two_int8_passes(variant, M, K, N):
    """avx2's one pass over an int16 input's rebuilt rows (gemm_packed16) gives accumulator halves
    whose value 128 hi + lo is the int64 product, lo in [0, 127], at the extremes: hi = lo = -128
    (a = -16512) against -128 weights (packed 0) and against 127 (packed 255: int32 lanes at their
    bound, 255 pairs of 2 * 16512 * 255 per K chunk of 1020), over one full chunk, a chunk and a
    short tail (1028), two full chunks (2044) and up to the largest K, row tails 1-5 past the
    6-row blocks, on 1 and 3 threads."""
    if "avx2" not in backend.cpu_flags():
        pytest.skip("no AVX2 on this CPU")
    g = torch.Generator().manual_seed(M + K + N)
    hi = torch.randint(-128, 128, (M, K), generator=g).to(torch.int8)
    lo = torch.randint(-128, 128, (M, K), generator=g).to(torch.int8)
    w = torch.randint(-128, 128, (N, K), generator=g).to(torch.int8)
    hi[0], lo[0], w[0] = -128, -128, -128
    w[-1] = 127
    if M > 1:
        hi[-1], lo[-1] = 127, 127
    q = torch.cat([hi, lo]).contiguous()
    ref = (hi.to(torch.int64) * 128 + lo.to(torch.int64)) @ w.to(torch.int64).t()
    assert int(ref.abs().max()) == 16512 * 128 * K
    for threads in (1, 3):
        out = backend.gemm_packed16(kernels.lib(variant), q, backend.pack_weight(w), N, threads)
        assert out is not None and out.shape == (2 * M, N)
        assert torch.equal(out[:M].to(torch.int64) * 128 + out[M:].to(torch.int64), ref), threads
        assert int(out[M:].min()) >= 0 and int(out[M:].max()) <= 127


def test_blas_stays_exact_at_reduced_matmul_precision():
    """torch.set_float32_matmul_precision("medium") allows bfloat16 products on CPUs with AMX:
    mm_f32 then computes in float64 and stays exact."""
    a, w = _extremes(5, 2048, 48, 11)
    ref = a.to(torch.int64) @ w.to(torch.int64).t()
    old = torch.get_float32_matmul_precision()
    try:
        for p in ("medium", "high"):
            torch.set_float32_matmul_precision(p)
            assert torch.equal(backend.mm_f32(a, backend.f32_weight(w)).to(torch.int64), ref)
    finally:
        torch.set_float32_matmul_precision(old)


def test_float32_chunk_bound():
    """The blas bound: F32_CHUNK products of the largest magnitude sum to 2^24, where float32 still
    holds every integer (2^24 + 1 it does not)."""
    assert backend.F32_CHUNK * 128 * 128 == 2**24
    assert float(torch.tensor(2.0**24, dtype=torch.float32)) == 2**24
    assert float(torch.tensor(2.0**24 + 1, dtype=torch.float32)) != 2**24 + 1


@needs_kernels
@pytest.mark.parametrize("form", backend.FORMS)
def test_engine_on_each_backend_equals_torch_ops(form):
    """The fused engine forced onto each backend (2 threads) gives the torch form's tables, parallel
    and stepped, on a tiny model whose shapes the packed kernels take."""
    _runnable(form)
    t = Engine.tiny(seed=9, dim=64, n_head=4, n_kv_head=2, ffn_dim=128, vocab_size=272, max_seq_len=80)
    e = Engine(t.config, t.tensors, backend=form, threads=2)
    assert e.backend.few == e.backend.many == form
    if form != "vnni":  # what an AVX2-only CPU encodes with: the fused AVX2 attention tile
        assert e._ops.attention == "avx2" and e.backend.variant == "noavx512"
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 272, (3, 70), generator=g)
    got = e.freqs(x)
    st = e.start(3, 70)
    steps = [e.step(st, x[:, i]) for i in range(70)]
    want = Engine(t.config, t.tensors, fused=False).freqs(x)
    assert torch.equal(got, want)
    for i in range(70):
        assert torch.equal(steps[i], want[:, i])


def test_forced_backend_errors(monkeypatch):
    """LLMFS_BACKEND names a backend this CPU runs, or it is an error saying why."""
    monkeypatch.setenv(backend.ENV, "sse9")
    with pytest.raises(backend.BackendError, match="unknown backend"):
        backend._choose()
    monkeypatch.setenv(backend.ENV, "vnni")
    monkeypatch.setattr(
        backend, "unsupported", lambda f: "this CPU has no AVX-512 VNNI (test)" if f == "vnni" else None
    )
    with pytest.raises(backend.BackendError, match="LLMFS_BACKEND=vnni: this CPU has no"):
        backend._choose()
    with pytest.raises(backend.BackendError):
        backend.select("vnni")
    monkeypatch.setenv(backend.ENV, "blas")
    b = backend._choose()
    assert (b.name, b.few, b.many, b.variant) == ("blas", "blas", "blas", "noavx512")
    assert "forced" in b.describe()


@needs_kernels
def test_choice_is_measured_once_cached_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(backend.ENV, raising=False)
    monkeypatch.setattr(backend, "_choice_path", lambda key: tmp_path / f"backend-{key}.json")
    measured = []
    real = backend._measure
    monkeypatch.setattr(
        backend, "_measure", lambda f, n, seconds=0.01: measured.append(f) or real(f, n, 0.01)
    )
    first = backend._choose()
    assert first.reason == "measured at first use" and measured
    runnable = [f for f in backend.FORMS if backend.unsupported(f) is None]
    assert first.few in runnable and first.many in runnable
    (saved,) = tmp_path.glob("backend-*.json")
    assert json.loads(saved.read_text())["few"] == first.few
    measured.clear()
    again = backend._choose()
    assert not measured and "earlier" in again.reason
    assert (again.few, again.many) == (first.few, first.many)
    monkeypatch.setattr(backend, "_current", None)
    monkeypatch.setattr(backend, "_choice_path", lambda key: tmp_path / "fresh.json")
    with caplog.at_level(logging.INFO, logger="llmfs"):
        backend.current()  # measured now: said at INFO
    assert any(
        "exact engine on" in r.getMessage() and "GEMM few rows" in r.getMessage() for r in caplog.records
    )


# ---- the kernels cache: only our own, not writable by others --------------------------------------


@pytest.fixture
def small_source(tmp_path, monkeypatch):
    """build() and load() on a one-line C file (kernels.c takes a minute to compile on a busy
    machine): the checks are the same."""
    src = tmp_path / "k.c"
    src.write_text("int llmfs_test_symbol(void) { return 7; }\n")
    monkeypatch.setattr(kernels, "_SOURCE", src)
    monkeypatch.setattr(kernels, "_SIGNATURES", {"llmfs_test_symbol": []})
    monkeypatch.setattr(kernels, "_RESTYPES", {"llmfs_test_symbol": ctypes.c_int})
    monkeypatch.setattr(kernels, "_private", None)


@needs_kernels
def test_cache_dir_is_private_and_checked(tmp_path, monkeypatch, caplog, small_source):
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path / "c" / "models"))
    path = kernels.build(("LLMFS_NO_CLONES",))
    d = kernels.cache_dir()
    assert path.parent == d and stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert kernels.load(path).llmfs_test_symbol() == 7  # ours, 0700: loads

    os.chmod(path, 0o775)  # group-writable object: refused
    with pytest.raises(RuntimeError, match="writable by group or others"):
        kernels.load(path)
    again = kernels.build(("LLMFS_NO_CLONES",))  # and rebuilt, not reused
    assert again == path and not os.stat(path).st_mode & (stat.S_IWGRP | stat.S_IWOTH)

    os.chmod(d, 0o777)  # a directory others can write to
    with pytest.raises(RuntimeError, match="writable by group or others"):
        kernels.load(path)
    with caplog.at_level(logging.WARNING):
        private = kernels.build(("LLMFS_NO_CLONES",))
    assert private.parent != d and stat.S_IMODE(os.stat(private.parent).st_mode) == 0o700
    assert "not using the kernels cache" in caplog.text
    kernels.load(private)


@needs_kernels
def test_cache_of_another_user_is_not_loaded(tmp_path, monkeypatch, small_source):
    """`sudo -E llmfs mount`: the cache belongs to the invoking user, not to root (simulated by
    pretending to run as another uid): nothing there is loaded, the kernels build elsewhere."""
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path / "models"))
    path = kernels.build(("LLMFS_NO_CLONES",))
    me = os.geteuid()
    monkeypatch.setattr(kernels.os, "geteuid", lambda: me + 4242)
    with pytest.raises(RuntimeError, match="owned by uid"):
        kernels.load(path)
    assert kernels._build_dir() != path.parent


# ---- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    from llmfs.codec.lm import loader

    return loader.load()


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("form", backend.FORMS)
def test_backends_on_the_real_weights(real, form):
    """Each form on the real model's weights (qkv, down: K = 1536, and 4,096 rows of the LM head)
    with int8 rows at the extremes, against the int64 product; and one short segment's frequency
    tables through the engine forced onto the form equal the default engine's."""
    _runnable(form)
    t = real.engine.tensors
    g = torch.Generator().manual_seed(1)
    for name in ("l0.qkv.q", "l29.down.q", "tok_emb.q"):
        w = t[name][:4096].contiguous()
        a = torch.randint(-128, 128, (9, w.shape[1]), generator=g).to(torch.int8)
        a[0], a[1] = -128, 127
        ref = a.to(torch.int64) @ w.to(torch.int64).t()
        assert torch.equal(_gemm(form, a, w, 2).to(torch.int64), ref), name
    e = real.engine
    forced = Engine(e.config, e.tensors, backend=form, threads=2)
    x = torch.randint(0, e.vocab_size, (1, 24), generator=g)
    x[0, 0] = e.bos_id
    want = e.freqs(x)
    assert torch.equal(forced.freqs(x), want)
    st = forced.start(2, 4)
    for i in range(4):
        assert torch.equal(forced.step(st, x[0, i].repeat(2))[0], want[0, i])


def _thread_nices() -> dict[int, int]:
    """tid -> nice of this process's threads (/proc/self/task/*/stat, field 19)."""
    out = {}
    for task in os.listdir("/proc/self/task"):
        try:
            stat_line = open(f"/proc/self/task/{task}/stat").read()
        except OSError:
            continue
        out[int(task)] = int(stat_line.rsplit(")", 1)[1].split()[16])
    return out


@needs_kernels
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_worker_pool_concurrent_callers_nice_and_fork():
    """kernels.c's persistent helper threads: callers on several threads at once (one gets the pool,
    the others their own threads) all get the exact product; a nice-19 caller's helpers run at nice
    19 (a pool per nice value) and sleep between calls; a forked child, which has none of the
    parent's helpers, still computes (no hang)."""
    import threading
    import time

    _runnable("avx2")
    lib = kernels.lib("noavx512")
    a, w = _extremes(40, 576, 192, 5)
    wp, ref = backend.pack_weight(w), a.to(torch.int64) @ w.to(torch.int64).t()
    errors = []

    def work(nice):
        try:
            if nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            for _ in range(20):
                out = backend.gemm_packed(lib, "avx2", a, wp, 192, 2)
                if not torch.equal(out.to(torch.int64), ref):
                    errors.append(nice)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    before = set(_thread_nices())
    threads = [threading.Thread(target=work, args=(n,)) for n in (0, 0, 19, 19)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    nices = _thread_nices()  # the callers have ended: what is left are helpers (and others')
    new = {tid: n for tid, n in nices.items() if tid not in before}
    # the nice-19 pool's helpers: made by a nice-19 caller now, or earlier in this process (the
    # pool outlives its callers: an earlier test's compaction may have made it)
    assert 19 in new.values() or 19 in nices.values()
    time.sleep(0.05)
    for tid in new:  # the helpers still there sleep on the condition variable, not spinning
        try:
            state = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # a thread that ended (the callers)
        assert state in ("S", "D"), state
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = torch.equal(backend.gemm_packed(lib, "avx2", a, wp, 192, 2).to(torch.int64), ref)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:  # pragma: no cover - a hang
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in the worker pool")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


def test_inexact_intmm_is_refused(monkeypatch):
    """A torch._int_mm that saturates (oneDNN's vpmaddubsw without VNNI/AMX) is not a backend: the
    probe at the int8 extremes catches it and says why; an exact one passes."""
    exact = backend.mm_intmm

    def saturating(q, w):  # pair sums clamped to int16, as vpmaddubsw does
        p = (q.to(torch.int32).unsqueeze(1) * w.to(torch.int32).unsqueeze(0)).view(
            q.shape[0], w.shape[0], -1, 2
        )
        return p.sum(-1).clamp(-32768, 32767).sum(-1).to(torch.int32)

    try:
        backend._intmm_inexact.cache_clear()
        monkeypatch.setattr(backend, "mm_intmm", saturating)
        assert "not exact" in backend.unsupported("intmm")
        backend._intmm_inexact.cache_clear()
        monkeypatch.setattr(backend, "mm_intmm", lambda q, w: q.to(torch.int32) @ w.to(torch.int32).t())
        assert backend.unsupported("intmm") is None
    finally:
        monkeypatch.setattr(backend, "mm_intmm", exact)
        backend._intmm_inexact.cache_clear()


def test_reference_form_is_exact_where_intmm_saturates(monkeypatch):
    """The torch reference form (no kernels: no C compiler, or the tables tests compare against)
    multiplies with torch._int_mm only where the probe found it exact; where oneDNN saturates it
    takes the float32 chunks, so its tables stay those of every other machine."""
    t = Engine.tiny(seed=5, dim=64, n_head=4, n_kv_head=2, ffn_dim=128, vocab_size=272, max_seq_len=40)
    x = torch.randint(0, 272, (2, 30), generator=torch.Generator().manual_seed(1))
    want = Engine(t.config, t.tensors, fused=False).freqs(x)

    def saturating(q, w):  # pair sums clamped to int16, as vpmaddubsw does
        p = (q.to(torch.int32).unsqueeze(1) * w.to(torch.int32).unsqueeze(0)).view(
            q.shape[0], w.shape[0], -1, 2
        )
        return p.sum(-1).clamp(-32768, 32767).sum(-1).to(torch.int32)

    exact = backend.mm_intmm
    try:
        backend._intmm_inexact.cache_clear()
        monkeypatch.setattr(backend, "mm_intmm", saturating)
        assert backend._intmm_inexact()
        assert torch.equal(Engine(t.config, t.tensors, fused=False).freqs(x), want)
    finally:
        monkeypatch.setattr(backend, "mm_intmm", exact)
        backend._intmm_inexact.cache_clear()
