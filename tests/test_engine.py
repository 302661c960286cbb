"""The exact engine (docs/design.md, "Exactness"): integer frequency tables are bit-identical whatever the batch
composition, padding, parallel vs incremental evaluation and thread count."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from llmfs.codec.lm import backend, kernels
from llmfs.codec.lm.engine import (
    ACT_MAX,
    FREQ_TOTAL_BITS,
    Engine,
    FusedOps,
    TorchOps,
    _table32,
    det_sqrt,
    sigmoid_table,
)


@pytest.fixture(scope="module")
def engine():
    return Engine.tiny(seed=0)


def _tokens(engine, b, t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, engine.vocab_size, (b, t), generator=g)
    x[:, 0] = engine.bos_id
    return x


def test_freqs_shape_dtype_bounds(engine):
    f = engine.freqs(_tokens(engine, 3, 50, 1))
    assert f.dtype == torch.int32 and f.shape == (3, 50, engine.vocab_size)
    assert int(f.min()) >= 1
    total = f.sum(-1, dtype=torch.int64)
    assert int(total.max()) <= 2**FREQ_TOTAL_BITS
    assert int(total.min()) > 2**FREQ_TOTAL_BITS - engine.vocab_size  # the budget is used
    # not degenerate: the model prefers some tokens
    assert int(f.max()) > 100 * int(f.median())


def test_batch_size_and_neighbours_do_not_matter(engine):
    x = _tokens(engine, 8, 64, 2)
    lengths = [64, 17, 40, 3, 64, 33, 50, 9]
    ref = [engine.freqs(x[i : i + 1, :n])[0] for i, n in enumerate(lengths)]
    # batch of 8: each row padded after its length with different junk
    padded = x.clone()
    for i, n in enumerate(lengths):
        padded[i, n:] = (i * 7) % engine.vocab_size
    f8 = engine.freqs(padded)
    for i, n in enumerate(lengths):
        assert torch.equal(f8[i, :n], ref[i])
    # batch of 3 with other neighbours and other padding
    rows = [5, 1, 6]
    x3 = torch.stack([x[r] for r in rows])
    x3[1, lengths[1] :] = 0
    f3 = engine.freqs(x3[:, :55])
    for j, r in enumerate(rows):
        n = min(lengths[r], 55)
        assert torch.equal(f3[j, :n], ref[r][:n])


def test_incremental_equals_parallel(engine):
    x = _tokens(engine, 5, 48, 3)
    full = engine.freqs(x)
    state = engine.start(5, 48)
    for t in range(48):
        assert torch.equal(engine.step(state, x[:, t]), full[:, t]), t
    # a single row decoded alone matches too (rows decoded together do not interact)
    state = engine.start(1, 20)
    for t in range(20):
        assert torch.equal(engine.step(state, x[2:3, t]), full[2:3, t])


def test_seeds_and_fingerprints_differ():
    a, b = Engine.tiny(seed=0), Engine.tiny(seed=1)
    assert a.fingerprint != b.fingerprint and len(a.fingerprint) == 16
    assert Engine.tiny(seed=0).fingerprint == a.fingerprint


def test_limits(engine):
    with pytest.raises(ValueError):
        engine.freqs(torch.full((1, engine.max_seq_len + 1), engine.bos_id))
    with pytest.raises(ValueError):
        engine.freqs(torch.tensor([[engine.vocab_size]]))
    state = engine.start(1, 2)
    engine.step(state, torch.tensor([1]))
    engine.step(state, torch.tensor([1]))
    with pytest.raises(ValueError):
        engine.step(state, torch.tensor([1]))


_THREADS_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    from llmfs.codec.lm.engine import Engine
    e = Engine.tiny(seed=3, dim=128, n_head=4, n_kv_head=2, ffn_dim=256, n_layer=2)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, e.vocab_size, (4, 200), generator=g)
    f = e.freqs(x)
    s = e.start(4, 10)
    rows = [e.step(s, x[:, t]) for t in range(10)]
    sys.stdout.buffer.write(f.numpy().tobytes() + torch.stack(rows, 1).numpy().tobytes())
""")


def test_thread_count_does_not_matter():
    """1 thread in one process, 2 in another: the tables are byte-identical."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = [
        subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT, str(n)], cwd=root, capture_output=True, check=True
        ).stdout
        for n in (1, 2)
    ]
    assert len(outs[0]) > 1000 and outs[0] == outs[1]


needs_kernels = pytest.mark.skipif(kernels.lib() is None, reason="no C compiler for kernels.c")


@needs_kernels
def test_fused_kernels_equal_torch_ops():
    """kernels.c (CPU) and the torch ops (any device) give the same tables, parallel and stepped."""
    e = Engine.tiny(seed=5, dim=128, n_head=4, n_kv_head=2, ffn_dim=256, max_seq_len=512)
    t = Engine(e.config, e.tensors, fused=False)
    assert e.fused and not t.fused
    x = _tokens(e, 3, 300, 6)  # 3 attention blocks
    assert torch.equal(e.freqs(x), t.freqs(x))
    se, st = e.start(3, 12), t.start(3, 12)
    for i in range(12):
        assert torch.equal(e.step(se, x[:, i]), t.step(st, x[:, i]))


@needs_kernels
@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 37.0, 1e4])
def test_fused_ops_equal_torch_ops(scale):
    """Each fused op on random inputs over a range of magnitudes, ties included."""
    g = torch.Generator().manual_seed(int(scale * 1000) % 997)
    fused, ref = FusedOps(kernels.lib()), TorchOps()
    x = torch.randn(37, 96, generator=g, dtype=torch.float64) * scale
    x[3] = torch.round(x[3] * 4) / 4  # exact halves: rounding ties
    x[5] = 0  # an all-zero row
    w = 1 + 0.1 * torch.randn(96, generator=g, dtype=torch.float64)
    for int8 in (False, True):
        for a, b in [
            (fused.quant_rows(x, int8), ref.quant_rows(x, int8)),
            (fused.rmsnorm_quant(x, w, 1e-5, int8), ref.rmsnorm_quant(x, w, 1e-5, int8)),
        ]:
            assert a[0].shape == (37 if int8 else 74, 96)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ws = torch.rand(96, generator=g, dtype=torch.float64) * scale * 1e-6
    s = torch.rand(37, 1, generator=g, dtype=torch.float64)
    for rows in (2 * 37, 37):  # stacked hi/lo (int16 input), single (int8)
        acc = torch.randint(-(2**30), 2**30, (rows, 96), generator=g, dtype=torch.int32)
        assert torch.equal(fused.combine(acc, ws, s), ref.combine(acc, ws, s))
        assert torch.equal(fused.combine(acc, ws, s, x.clone()), ref.combine(acc, ws, s, x.clone()))
        a = fused.swiglu_quant(acc, ws, s, sigmoid_table())
        b = ref.swiglu_quant(acc, ws, s, sigmoid_table())
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_det_sqrt_is_accurate():
    d = torch.cat([torch.logspace(-12, 12, 999, dtype=torch.float64), torch.tensor([1e-5, 2.0, 4.0])])
    r = det_sqrt(d)
    want = torch.tensor([math.sqrt(v) for v in d.tolist()], dtype=torch.float64)
    assert float(((r - want).abs() / want).max()) <= 2.3e-16  # within one ulp


def test_reset_rows_starts_a_new_segment(engine):
    """A row refilled mid-batch gives exactly the parallel tables of its new segment, and its
    neighbours are unaffected (so decode batches stay full)."""
    x = _tokens(engine, 3, 40, 7)
    new = _tokens(engine, 1, 25, 8)[0]
    full, full_new = engine.freqs(x), engine.freqs(new[None])[0]
    state = engine.start(3, 40)
    for t in range(15):
        assert torch.equal(engine.step(state, x[:, t]), full[:, t])
    engine.reset_rows(state, [1])
    for t in range(25):
        feed = x[:, 15 + t].clone()
        feed[1] = new[t]
        rows = engine.step(state, feed)
        assert torch.equal(rows[0], full[0, 15 + t]) and torch.equal(rows[2], full[2, 15 + t])
        assert torch.equal(rows[1], full_new[t]), t


def test_stepping_a_prefix_of_the_rows(engine):
    """state.rows(n) steps rows 0..n-1 only (the decoder leaves idle rows past the last busy one
    out): those rows get the parallel tables, the others keep their positions and continue."""
    x = _tokens(engine, 4, 30, 9)
    full = engine.freqs(x)
    state = engine.start(4, 30)
    for t in range(10):
        assert torch.equal(engine.step(state, x[:, t]), full[:, t])
    for t in range(10, 22):
        assert torch.equal(engine.step(state.rows(2), x[:2, t]), full[:2, t])
    assert state.pos.tolist() == [22, 22, 10, 10]
    for t in range(10, 18):  # the others catch up, then all four again
        feed = x[:, t].clone()
        feed[:2] = x[:2, t + 12]
        rows = engine.step(state, feed)
        assert torch.equal(rows[:2], full[:2, t + 12]) and torch.equal(rows[2:], full[2:, t])


@needs_kernels
def test_attend_step_equals_torch_attend():
    """kernels.c attend_step (one query per row on the int16 cache) against the float64 GEMM form,
    at late positions and at the int32 chunk bounds of its P.V sums: every value at +-2^14 and
    every visible weight at its maximum (f ~ 0), so each chunk is as full as the bound allows."""
    from llmfs.codec.lm.engine import KV_BITS, Q_MAX, attn_exp_table

    g = torch.Generator().manual_seed(11)
    B, nkv, grp, L, hs = 4, 2, 3, 700, 64
    nh = nkv * grp
    lim = 2**KV_BITS
    keys = torch.randint(-lim, lim + 1, (B, nkv, L, hs), generator=g).to(torch.int16)
    values = torch.randint(-lim, lim + 1, (B, nkv, L, hs), generator=g).to(torch.int16)
    values[3] = lim * torch.where(torch.rand(nkv, L, hs, generator=g) < 0.5, -1, 1)
    values[2] = lim
    qi = torch.randint(-Q_MAX, Q_MAX + 1, (B, nh, 1, hs), generator=g).to(torch.float64)
    f = torch.rand(B, nh, 1, generator=g, dtype=torch.float64) * 1e-5
    f[2:] = 1e-30  # visible weights all 2^P_BITS
    qpos = torch.tensor([[0], [350], [699], [698]])
    vscale = torch.ldexp(
        torch.ones(nkv, 1, hs, dtype=torch.float64), torch.randint(-12, -4, (nkv, 1, hs), generator=g)
    )
    table = attn_exp_table()
    outs = []
    for ops in (FusedOps(kernels.lib()), TorchOps()):
        out = torch.empty(B, 1, nh * hs, dtype=torch.float64)
        ops.attend(qi, f, keys, values, qpos, [L], vscale, table, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_smoothing_is_exact_and_deterministic(monkeypatch):
    """calibrate + prepare_weights (what the loader does): the per-channel powers of two divide
    ffn_norm exactly, calibration gives the same tensors twice, and the smoothed engine keeps the
    batch and incremental invariants."""
    import numpy as np
    from llmfs.codec.lm import engine as E

    got = {}
    real = E.prepare_weights
    monkeypatch.setattr(E, "prepare_weights", lambda c, f, *a: got.setdefault("f", f) and real(c, f, *a))
    plain = Engine.tiny(seed=3)
    monkeypatch.setattr(E, "prepare_weights", real)
    cfg, f = plain.config, got["f"]
    toks = _tokens(plain, 1, 60, 4)[0].tolist()
    t1 = real(cfg, f, E.calibrate(cfg, f, toks))
    t2 = real(cfg, f, E.calibrate(cfg, f, toks))
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    for i in range(cfg.n_layer):
        ratio = np.asarray(f[f"l{i}.ffn_norm"], dtype=np.float64) / t1[f"l{i}.ffn_norm"].numpy()
        m, _ = np.frexp(ratio)
        assert np.all(m == 0.5)  # powers of two
    assert not all(torch.equal(t1[k], plain.tensors[k]) for k in t1)
    e = Engine(cfg, t1)
    x = _tokens(e, 3, 40, 5)
    full = e.freqs(x)
    assert torch.equal(e.freqs(x[1:2]), full[1:2])
    st = e.start(3, 40)
    for t in range(40):
        assert torch.equal(e.step(st, x[:, t]), full[:, t])


def _attend_step_inputs(seed, B, nkv, grp, L, hs):
    """Random decoding-attention inputs at the bounds: |q| <= Q_MAX, |k|, |v| <= 2^KV_BITS, rows
    with every visible weight at its maximum (f ~ 0, values all +2^14: int32 chunks as full as the
    bound allows), rows at positions around the 16-key blocks of the VNNI form."""
    from llmfs.codec.lm.engine import KV_BITS, Q_MAX

    g = torch.Generator().manual_seed(seed)
    nh, lim = nkv * grp, 2**KV_BITS
    keys = torch.randint(-lim, lim + 1, (B, nkv, L, hs), generator=g).to(torch.int16)
    values = torch.randint(-lim, lim + 1, (B, nkv, L, hs), generator=g).to(torch.int16)
    values[1] = lim
    values[2] = -lim
    qi = torch.randint(-Q_MAX, Q_MAX + 1, (B, nh, 1, hs), generator=g).to(torch.float64)
    qi[3] = Q_MAX
    keys[3] = lim
    f = torch.rand(B, nh, 1, generator=g, dtype=torch.float64) * 10 ** -torch.randint(
        2, 7, (B, nh, 1), generator=g
    ).to(torch.float64)
    f[1:3] = 1e-30  # visible weights all 2^P_BITS
    qpos = torch.tensor([[L - 1], [L - 1], [L - 2], [15], [16], [17], [0], [L // 2]][:B])
    vscale = torch.ldexp(
        torch.ones(nkv, 1, hs, dtype=torch.float64), torch.randint(-12, -4, (nkv, 1, hs), generator=g)
    )
    return qi, f, keys, values, qpos, vscale


def _attend_step(lib, impl, qi, f, keys, values, qpos, vscale, threads=1):
    from llmfs.codec.lm.engine import attn_exp_table

    B, nh, _, hs = qi.shape
    nkv, L = keys.shape[1], keys.shape[2]
    table = attn_exp_table().to(torch.int32)
    pos = qpos[:, 0].contiguous()
    out = torch.empty(B, 1, nh * hs, dtype=torch.float64)
    ran = lib.attend_step(
        qi.data_ptr(),
        f.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        B,
        nkv,
        nh // nkv,
        L,
        hs,
        pos.data_ptr(),
        table.data_ptr(),
        table.numel(),
        vscale.data_ptr(),
        out.data_ptr(),
        impl,
        threads,
        1,
    )
    return out, ran


@needs_kernels
@pytest.mark.parametrize("L, hs", [(700, 64), (33, 32), (16, 128), (1, 16)])
def test_kv_store_equals_torch(L, hs):
    """kernels.c kv_store (the fused engine's cache write) puts keys and values where the torch
    form does, at the first and last positions and at the bounds +-2^KV_BITS."""
    from llmfs.codec.lm.engine import KV_BITS

    g = torch.Generator().manual_seed(L + hs)
    B, nkv, lim = 6, 2, 2**KV_BITS
    keys = torch.randint(-lim, lim + 1, (B, nkv, L, hs), generator=g).to(torch.int16)
    values = torch.randint(-lim, lim + 1, (B, nkv, L, hs), generator=g).to(torch.int16)
    fused, ref = FusedOps(kernels.lib()), TorchOps()
    kf, vf, kt, vt = keys.clone(), values.clone(), keys.clone(), values.clone()
    for pos in ([0, 15, 16, 17, L - 1, L // 2], [L - 1] * 6, [0] * 6):
        pos = torch.tensor(pos).clamp(max=L - 1)
        ki = torch.randint(-lim, lim + 1, (B, nkv, 1, hs), generator=g).to(torch.float64)
        vi = torch.randint(-lim, lim + 1, (B, nkv, 1, hs), generator=g).to(torch.float64)
        ki[0], vi[1], ki[2], vi[3] = lim, -lim, -lim, lim
        fused.store_kv(ki, vi, pos, kf, vf)
        ref.store_kv(ki, vi, pos, kt, vt)
        assert torch.equal(kf, kt) and torch.equal(vf, vt)


@needs_kernels
@pytest.mark.parametrize(
    "M, K, N",
    [
        (1, 4, 16),
        (7, 576, 48),
        (8, 576, 32),
        (9, 64, 80),
        (64, 576, 3072),
        (130, 1536, 576),
        (128, 576, 1024),
        (17, 8, 64),
    ],
)
def test_gemm_packed_equals_int_mm(M, K, N):
    """kernels.c gemm_packed (decoding's linear layers, AVX-512 VNNI on pack_weight's layout)
    gives torch._int_mm's integers: row and column blocks with tails, every int8 extreme (the
    largest accumulators: a row of -128 against a column of -128)."""
    from llmfs.codec.lm.engine import pack_weight

    g = torch.Generator().manual_seed(M + K + N)
    a = torch.randint(-128, 128, (M, K), generator=g).to(torch.int8)
    w = torch.randint(-128, 128, (N, K), generator=g).to(torch.int8)
    a[0], w[0], w[-1] = -128, -128, 127
    a[-1] = 127
    ref = a.to(torch.int64) @ w.to(torch.int64).t()
    if not backend._intmm_inexact():  # (oneDNN limited to AVX2 saturates: not a backend there)
        assert torch.equal(torch._int_mm(torch.cat([a, a.new_zeros(17, K)]), w.t())[:M].long(), ref)
    wp = pack_weight(w)  # held: the call only sees its address
    for impl, ok in ((2, _has_vnni()), (3, "avx2" in open("/proc/cpuinfo").read().split())):
        out = torch.full((M, N), 7, dtype=torch.int32)
        ran = kernels.lib().gemm_packed(a.data_ptr(), M, K, wp.data_ptr(), N, out.data_ptr(), impl, 1)
        assert ran == (impl if ok else 0)
        assert not ok or torch.equal(out.long(), ref)


@needs_kernels
@pytest.mark.parametrize("form", ["vnni", "avx2"])
def test_engine_with_packed_gemms_equals_torch_ops(form):
    """The fused engine (packed GEMMs for every row count) against the torch form, parallel and
    incremental, on a model whose shapes fit gemm_packed (N % 16, K % 4)."""
    from llmfs.codec.lm import backend
    from llmfs.codec.lm import engine as E

    why = backend.unsupported(form)
    if why:
        pytest.skip(why)
    t = Engine.tiny(seed=5, dim=64, n_head=4, n_kv_head=2, ffn_dim=128, vocab_size=272, max_seq_len=64)
    e = Engine(t.config, t.tensors, backend=form, threads=2)
    x = _tokens(e, 3, 40, 6)
    got = e.freqs(x)
    st = e.start(3, 40)
    steps = [e.step(st, x[:, t]) for t in range(40)]
    assert set(e._packed) and all(v is not None for v in e._packed.values())
    ref = Engine(e.config, e.tensors, fused=False)
    want = ref.freqs(x)
    assert torch.equal(got, want)
    for t in range(40):
        assert torch.equal(steps[t], want[:, t])
    assert E.PACKED_ROWS >= 2 * 64  # decoding batch 64 with int16 inputs


def _has_vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"))


@needs_kernels
@pytest.mark.parametrize(
    "shape",
    [(8, 3, 3, 700, 64), (8, 2, 2, 33, 32), (8, 1, 4, 129, 128), (8, 2, 3, 16, 96), (8, 3, 3, 4096, 64)],
)
def test_attend_step_vnni_equals_portable(shape):
    """The AVX-512 VNNI decoding kernel and the portable one give the same bits (the model's shape
    g=3, hs=64 is a specialised instance, the others the generic one), up to the longest cache."""
    B, nkv, grp, L, hs = shape
    args = _attend_step_inputs(sum(shape), B, nkv, grp, L, hs)
    lib = kernels.lib()
    ref, ran = _attend_step(lib, 1, *args)
    assert ran == 1
    out, ran = _attend_step(lib, 2, *args)
    assert ran == (2 if _has_vnni() else 1)
    assert torch.equal(out, ref)
    auto, ran = _attend_step(lib, 0, *args)
    assert torch.equal(auto, ref)
    for impl in (1, 2):  # rows split over threads: the same bits
        assert torch.equal(_attend_step(lib, impl, *args, threads=3)[0], ref)


@needs_kernels
@pytest.mark.parametrize(
    "shape",
    [
        (8, 3, 3, 700, 64),
        (8, 2, 2, 33, 32),
        (8, 1, 4, 129, 128),
        (8, 2, 3, 16, 96),
        (8, 1, 1, 9, 16),
        (8, 3, 3, 4096, 64),
    ],
)
@pytest.mark.parametrize("variant", ["full", "noavx512"])
def test_attend_step_avx2_equals_portable(shape, variant):
    """The AVX2 decoding kernel (impl 3; what auto runs on a CPU without VNNI, and in the build
    without AVX-512 code) gives the portable one's bits: the model's shape g=3, hs=64 as the
    specialised instance, the others (hs 16-128, 1-4 heads per group, positions around its 8-key
    blocks, rows at the weight and value bounds) the generic one, up to the longest cache."""
    if "avx2" not in open("/proc/cpuinfo").read().split():
        pytest.skip("no AVX2 on this CPU")
    B, nkv, grp, L, hs = shape
    args = _attend_step_inputs(sum(shape) + 1, B, nkv, grp, L, hs)
    lib = kernels.lib(variant)
    ref, ran = _attend_step(lib, 1, *args)
    assert ran == 1
    out, ran = _attend_step(lib, 3, *args)
    assert ran == 3
    assert torch.equal(out, ref)
    if variant == "noavx512":  # auto without VNNI: the AVX2 form
        auto, ran = _attend_step(lib, 0, *args)
        assert ran == 3 and torch.equal(auto, ref)
    assert torch.equal(_attend_step(lib, 3, *args, threads=3)[0], ref)


@needs_kernels
def test_kernels_without_clones_or_vnni_agree():
    """kernels.c built for the baseline ISA only, without target clones or the VNNI kernels, gives
    the same bits as the library in use (decoding attention and the whole engine)."""
    try:
        plain = kernels.load(kernels.build(("LLMFS_NO_CLONES", "LLMFS_NO_VNNI")))
    except Exception as e:  # pragma: no cover - compiler trouble
        pytest.skip(f"baseline build failed: {e}")
    args = _attend_step_inputs(3, 8, 3, 3, 300, 64)
    a, ran = _attend_step(plain, 2, *args)
    assert ran == 1  # no VNNI form in this build
    assert torch.equal(a, _attend_step(kernels.lib(), 0, *args)[0])
    e = Engine.tiny(seed=4, dim=192, n_head=6, n_kv_head=2, ffn_dim=256, max_seq_len=256)
    x = _tokens(e, 2, 140, 9)
    want = e.freqs(x)
    e._ops = FusedOps(plain)
    assert torch.equal(e.freqs(x), want)
    st = e.start(2, 20)
    for i in range(20):
        assert torch.equal(e.step(st, x[:, i]), want[:, i])


@needs_kernels
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 3, 300, 64), (2, 2, 2, 130, 32), (1, 1, 4, 70, 128), (2, 2, 3, 65, 96), (1, 3, 3, 1024, 64)],
)
def test_attend_many_queries_vnni_equals_digits_and_torch(shape):
    """Encoding attention (T > 1): the fused kernel on int16 operands (its VNNI and AVX2 tiles, the
    latter in both builds and on 1-3 threads), the int8 digit GEMMs, the per-query form and the
    float64 GEMMs give the same bits, with rows at the int32 chunk bounds of P.V (every visible
    weight 2^P_BITS and every value +-2^14) and ordinary random rows."""
    from llmfs.codec.lm.engine import ATTN_BLOCK, KV_BITS, Q_MAX, attn_exp_table

    B, nkv, grp, T, hs = shape
    g = torch.Generator().manual_seed(sum(shape))
    nh, lim = nkv * grp, 2**KV_BITS
    keys = torch.randint(-lim, lim + 1, (B, nkv, T, hs), generator=g).to(torch.float64)
    values = torch.randint(-lim, lim + 1, (B, nkv, T, hs), generator=g).to(torch.float64)
    qi = torch.randint(-Q_MAX, Q_MAX + 1, (B, nh, T, hs), generator=g).to(torch.float64)
    f = torch.rand(B, nh, T, 1, generator=g, dtype=torch.float64) * 1e-4
    values[0, 0] = lim  # chunk bounds: all weights at the maximum
    f[0, :grp] = 1e-30
    if B > 1:
        values[1, -1] = -lim
        f[1, -grp:] = 1e-30
        f[1, 0] = 1e-2  # sharp: most weights 0
    qpos = torch.arange(T).expand(B, T)
    kmax = [min(a + ATTN_BLOCK, T) for a in range(0, T, ATTN_BLOCK)]
    vscale = torch.ldexp(
        torch.ones(nkv, 1, hs, dtype=torch.float64), torch.randint(-12, -4, (nkv, 1, hs), generator=g)
    )
    table = attn_exp_table()
    outs = []
    # the per-query form (attend_step) in its VNNI and portable builds, on 1-3 threads
    steps = [
        FusedOps(kernels.lib(v), impl, attention="steps")
        for v, impl in (("full", 0), ("full", 1), ("noavx512", 0))
    ]
    # the AVX2 tile of attend_fwd, in the full build and in the one without AVX-512 code
    fused = [FusedOps(kernels.lib(v), 0, attention="avx2") for v in ("full", "noavx512")]
    for i, ops in enumerate(steps + fused):
        ops.threads = 1 + i % 3
    if "avx2" not in backend.cpu_flags():
        pytest.skip("no AVX2 on this CPU")
    qp, t32 = qpos.contiguous(), _table32(table)
    for ops in fused:  # the tile runs (impl 3: the AVX2 tile or nothing), not a fallback
        out = torch.zeros(B, T, nh * hs, dtype=torch.float64)
        ptrs = [t.data_ptr() for t in (qi, f, keys, values)]
        ran = ops.lib.attend_fwd(
            *ptrs, B, nkv, grp, T, T, hs, qp.data_ptr(), t32.data_ptr(), table.numel(),
            vscale.data_ptr(), out.data_ptr(), 3, ops.threads,
        )  # fmt: skip
        assert ran == 3
    for ops in (FusedOps(kernels.lib(), 0), FusedOps(kernels.lib(), 1), *steps, *fused, TorchOps()):
        out = torch.empty(B, T, nh * hs, dtype=torch.float64)
        ops.attend(qi, f, keys, values, qpos, kmax, vscale, table, out)
        outs.append(out)
    for out in outs[:-1]:
        assert torch.equal(out, outs[-1])


def _head_inputs(seed, M, V):
    """LM head accumulators over the whole range: ordinary logits, halves (rounding ties of
    max - z), logits far below the maximum (the table's last entry), an all-zero row, huge and tiny
    scales."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-(2**12), 2**12, (2 * M, V), generator=g, dtype=torch.int32)
    ws = torch.rand(V, generator=g, dtype=torch.float64) * 64
    s = torch.rand(M, 1, generator=g, dtype=torch.float64)
    ws[: V // 4] = 0.5  # z = value / 2 in rows with s = 1: ties
    s[1] = 1.0
    acc[M + 1] = 0  # lo = 0: row 1's values are multiples of 128
    acc[M + 1, : V // 4] = torch.randint(-3, 4, (V // 4,), generator=g)
    acc[1, V // 4 :] = 0  # the maximum among the halves
    acc[2], acc[M + 2] = 0, 0  # a zero row: every d = 0
    s[3] = 1e-9  # all logits within one step of the maximum
    s[4] = 1e6  # nearly all at the last entry
    acc[5, :3] = 2**24 // 128  # a few large values, the rest tiny
    return acc, ws, s


@needs_kernels
@pytest.mark.parametrize("M,V", [(6, 49152), (7, 1000), (6, 259), (8, 9), (6, 16)])
def test_head_freqs_avx512_equals_portable_and_torch(M, V):
    from llmfs.codec.lm.engine import logit_exp_table

    acc, ws, s = _head_inputs(M * 1000 + V, M, V)
    table = logit_exp_table()
    budget = 2**FREQ_TOTAL_BITS - V
    outs, ran = [], []
    for ops in (FusedOps(kernels.lib(), 1), FusedOps(kernels.lib(), 2), TorchOps()):
        out = torch.empty(M, V, dtype=torch.int32)
        ran.append(ops.head_freqs(acc, ws, s, table, budget, out))
        outs.append(out)
    assert ran[:2] == [1, 2 if _has_avx512() else 1]
    z = TorchOps().combine(acc, ws, s)
    d = z.amax(dim=1, keepdim=True) - z
    assert bool(((d[1] - d[1].floor()) == 0.5).any())  # ties for round-half-even
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])
    assert int(outs[2][2].min()) > 1 and int((outs[2][4] == 1).sum()) >= V - 3
    assert int(outs[2].sum(dim=1).max()) <= 2**FREQ_TOTAL_BITS


def _has_avx512() -> bool:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl"))


@needs_kernels
@pytest.mark.parametrize("K", [1, 7, 16, 17, 96, 576, 1539])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_elementwise_avx512_equals_portable_and_torch(K, scale):
    """quant_rows, rmsnorm_quant, swiglu_quant and combine: the AVX-512 forms (whole and masked blocks of 16),
    the portable loops and the torch ops agree, with rounding ties (quantisation and the sigmoid
    table index), zero rows, inputs beyond the sigmoid range and tiny/huge magnitudes."""
    g = torch.Generator().manual_seed(K * 7 + int(scale * 10) % 1000)
    forms = (FusedOps(kernels.lib(), 1), FusedOps(kernels.lib(), 2), TorchOps())
    x = torch.randn(9, K, generator=g, dtype=torch.float64) * scale
    x[1] = torch.round(x[1] * 4) / 4  # exact quarters and halves: ties
    x[1, 0] = 2.0 * scale  # so that the row's scale is a power of two
    x[2] = 0  # an all-zero row
    x[3, ::2] = 1e-300  # tiny next to ordinary values
    x[4] = torch.randint(-ACT_MAX, ACT_MAX, (K,), generator=g, dtype=torch.float64) + 0.5
    x[4, 0] = ACT_MAX  # s = 1: x / s has ties at .5
    w = 1 + 0.1 * torch.randn(K, generator=g, dtype=torch.float64)

    def same(name, *args):
        r = [getattr(f, name)(*args) for f in forms]
        for a in r[1:]:
            assert torch.equal(a[0], r[0][0]) and torch.equal(a[1], r[0][1]), name

    for int8 in (False, True):
        same("quant_rows", x, int8)
        same("rmsnorm_quant", x, w, 1e-5, int8)
    sig = sigmoid_table()
    for rows in (2 * 9, 9):  # stacked hi/lo, single
        acc = torch.randint(-(2**20), 2**20, (rows, 2 * K), generator=g, dtype=torch.int32)
        acc[1] = torch.randint(-(2**18), 2**18, (2 * K,), generator=g)
        acc[2] = 0
        if rows == 2 * 9:
            acc[9 + 1] = torch.randint(-64, 64, (2 * K,), generator=g)  # odd values: ties
            acc[9 + 2] = 0
        ws = torch.rand(2 * K, generator=g, dtype=torch.float64) * scale * 1e-5
        ws[:K] = 2.0**-13  # gate = acc * 2^-13 * s: index ties ...
        s = torch.rand(9, 1, generator=g, dtype=torch.float64)
        s[1] = 1.0  # ... in row 1 (odd acc), |gate| up to 32
        s[5] = 1e6  # gates far beyond +-24
        same("swiglu_quant", acc, ws, s, sig)
        for add in (False, True):
            r = [f.combine(acc, ws, s, x.repeat(1, 2).clone() if add else None) for f in forms]
            assert torch.equal(r[0], r[2]) and torch.equal(r[1], r[2]), "combine"
