"""Model loading: the default GGUF converts once, the cache is reused and verified, and
models the exact engine cannot run are refused with a clear message."""

import shutil

import numpy as np
import pytest
import torch
from llmfs.codec.lm import loader
from llmfs.codec.lm.loader import DEFAULT_MODEL, UnsupportedModel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """CI shares 2 cores; oversubscribed OpenMP threads make small real-model steps ~70x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    return cache, loader.load(DEFAULT_MODEL, cache_dir=str(cache))


@pytest.mark.slow
def test_default_model_converts(converted):
    cache, m = converted
    c = m.engine.config
    assert (c.n_layer, c.dim, c.n_head, c.n_kv_head, c.head_dim, c.ffn_dim, c.vocab_size) == (
        30,
        576,
        9,
        3,
        64,
        1536,
        49152,
    )
    assert c.rope_theta == 100000.0 and c.tied_embeddings and m.engine.bos_id == 1
    assert len(m.engine.fingerprint) == 16
    assert '"model"' in m.tokenizer_json and m.source.endswith(".gguf")
    assert len(list(cache.glob("*.llmfsmodel"))) == 1


@pytest.mark.slow
def test_cache_is_reused_without_dequantising(converted, monkeypatch):
    cache, m = converted
    monkeypatch.setattr(loader, "convert", lambda path: pytest.fail("converted again"))
    again = loader.load(None, cache_dir=str(cache))
    assert again.engine.fingerprint == m.engine.fingerprint
    assert again.tokenizer_json == m.tokenizer_json


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(converted, tmp_path, monkeypatch):
    cache, m = converted
    src = next(cache.glob("*.llmfsmodel"))
    bad = tmp_path / src.name
    shutil.copy(src, bad)
    with open(bad, "r+b") as f:  # flip bytes inside the weights, header intact
        f.seek(bad.stat().st_size // 2)
        f.write(b"\xff" * 64)
    calls = []
    real = loader.convert
    monkeypatch.setattr(loader, "convert", lambda path: calls.append(path) or real(path))
    rebuilt = loader.load(DEFAULT_MODEL, cache_dir=str(tmp_path))
    assert calls and rebuilt.engine.fingerprint == m.engine.fingerprint
    # a truncated file (a crash mid-write without the rename) is rebuilt as well
    with open(bad, "r+b") as f:
        f.truncate(1000)
    calls.clear()
    assert (
        loader.load(DEFAULT_MODEL, cache_dir=str(tmp_path)).engine.fingerprint == m.engine.fingerprint
        and calls
    )


@pytest.mark.slow
def test_real_model_batch_and_incremental_agree(converted):
    e = converted[1].engine
    x = torch.tensor(
        [[e.bos_id, 504, 3271, 314, 253, 1789, 30, 1330], [e.bos_id, 14, 4200, 11, 2240, 6, 6, 6]]
    )
    full = e.freqs(x)
    assert torch.equal(e.freqs(x[1:, :5])[0], full[1, :5])
    state = e.start(2, 8)
    for t in range(8):
        assert torch.equal(e.step(state, x[:, t]), full[:, t])
    assert int(full.min()) >= 1 and int(full.sum(-1).max()) <= 2**24


def test_garbage_file_is_unsupported(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"not a model at all" * 10)
    with pytest.raises(UnsupportedModel, match="not a GGUF"):
        loader.load(str(p), cache_dir=str(tmp_path / "c"))


def test_non_llama_gguf_is_unsupported(tmp_path):
    import gguf

    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="architecture 'gpt2'"):
        loader.load(str(p), cache_dir=str(tmp_path / "c"))


def test_non_llama_directory_is_unsupported(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(UnsupportedModel, match="gpt_neox"):
        loader.load(str(tmp_path), cache_dir=str(tmp_path / "c"))


def test_missing_path_is_unsupported(tmp_path):
    with pytest.raises(UnsupportedModel, match="no such file"):
        loader.load(str(tmp_path / "nope.gguf"), cache_dir=str(tmp_path / "c"))
