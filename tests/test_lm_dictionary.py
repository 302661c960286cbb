"""The store dictionary (codec/lm/dictionary.py, payload version 4): a priming context whose KV
state (engine.Engine.prefix) is computed once and continued by every segment.

Exactness first: a prefix's cached keys must be the integers the engine computes for those tokens
in one pass, on every backend, in the parallel encoder pass (hidden(prefix=)) and in the stepped
decoder (reset_rows(prefix=)). All on the tiny models (seconds)."""

from __future__ import annotations

import pytest
import torch
from llmfs.codec.lm import backend, kernels
from llmfs.codec.lm.engine import Engine


def _tiny() -> Engine:
    return Engine.tiny(seed=9, dim=64, n_head=4, n_kv_head=2, ffn_dim=128, vocab_size=272, max_seq_len=200)


def _engines():
    t = _tiny()
    out = [("torch", Engine(t.config, t.tensors, fused=False))]
    if kernels.lib() is not None:
        for form in backend.FORMS:
            if backend.unsupported(form) is None:
                out.append((form, Engine(t.config, t.tensors, backend=form, threads=2)))
    return out


@pytest.mark.parametrize("name, engine", _engines(), ids=lambda x: x if isinstance(x, str) else "")
def test_prefix_continues_exactly_on_every_backend(name, engine):
    """hidden(seg, prefix=P) and stepping after reset_rows(prefix=P) give the rows of one plain
    pass over P + seg, bit for bit; the prefix's keys are the ones step() caches."""
    g = torch.Generator().manual_seed(5)
    pre = [engine.bos_id] + torch.randint(0, 271, (90,), generator=g).tolist()  # > one ATTN_BLOCK
    seg = torch.randint(0, 271, (3, 75), generator=g)
    want = _tiny().freqs(torch.cat([torch.tensor([pre] * 3), seg], dim=1))[:, len(pre) :]
    p = engine.prefix(pre)
    assert p.length == len(pre) and p.k[0].dtype == torch.int16
    got = engine.head(engine.hidden(seg, prefix=p).view(3 * 75, -1)).view(3, 75, -1)
    assert torch.equal(got, want)
    st = engine.start(4, len(pre) + 75)  # one extra row that stays idle at position 0
    for t in range(len(pre)):
        engine.step(st.rows(1), torch.tensor([pre[t]]))
    for i in range(engine.config.n_layer):  # the prefix's keys are what stepping caches
        assert torch.equal(st.k[i][:1, :, : len(pre)], p.k[i])
        assert torch.equal(st.v[i][:1, :, : len(pre)], p.v[i])
    engine.reset_rows(st, [0, 1, 2], prefix=p)
    assert st.pos.tolist()[:3] == [len(pre)] * 3
    for t in range(75):
        assert torch.equal(engine.step(st.rows(3), seg[:, t]), want[:, t])


def test_prefix_bounds():
    e = _tiny()
    with pytest.raises(ValueError):
        e.prefix([])
    p = e.prefix([e.bos_id] * 150)
    with pytest.raises(ValueError):
        e.hidden(torch.zeros(1, 60, dtype=torch.long), prefix=p)  # 150 + 60 > 200
    with pytest.raises(ValueError):
        e.reset_rows(e.start(1, 100), [0], prefix=p)
