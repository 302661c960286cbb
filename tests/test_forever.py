"""LM blocks stay readable forever. A store holds the models its blocks need (model files,
verified by hash); decoding depends on nothing in the environment (conversion cache, HOME, the
model's source files, the tokenizer JSON's serialisation); older store formats open; engine
versions this release lacks are refused with a message; the cache is trusted only when it is ours.

The model here is a small Llama directory made in the test (random weights, a byte-level BPE
tokenizer with merges and an <|endoftext|> token): the same conversion path as a real model, in
seconds."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from llmfs.codec import Registry, container
from llmfs.codec.lm import codec_of, engines, loader, modelfile
from llmfs.codec.lm.engine import Engine
from llmfs.codec.lm.tokenizer import gpt2_bytes_to_unicode
from llmfs.codec.registry import LM, peek_header

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.models import Models, UndecodableStore, model_report
from llmfs.store import DB_NAMES_V1, DB_NAMES_V2, FORMAT_VERSION, ROOT_INO, Store, UnsupportedFormat

BS = 4096
TEXTS = {
    b"en.txt": b"The quick brown fox jumps over the lazy dog. " * 40,
    b"ru.txt": "Съешь же ещё этих мягких французских булок. ".encode() * 30,
    b"code.py": b"def f(x):\n    return x * 2 + 1\n\n" * 60,
}
MERGES = [("t", "h"), ("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("e", "r"), ("o", "u"), ("Ġ", "a"), ("th", "e")]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_model_dir(path, seed: int = 0):
    """A tiny Llama directory: config.json, model.safetensors, tokenizer.json (byte-level BPE)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    b2u = gpt2_bytes_to_unicode()
    vocab = {"<|endoftext|>": 0}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": 0,
                "content": "<|endoftext|>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in MERGES],
        },
    }
    (path / "tokenizer.json").write_text(json.dumps(tok))
    V, D, L, H, F = len(vocab), 64, 2, 4, 128
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": V,
                "hidden_size": D,
                "num_hidden_layers": L,
                "num_attention_heads": H,
                "num_key_value_heads": 2,
                "intermediate_size": F,
                "max_position_embeddings": 256,
                "bos_token_id": 0,
                "tie_word_embeddings": True,
            }
        )
    )
    rng = np.random.default_rng(seed)
    g = lambda *s: torch.from_numpy(rng.normal(0, 0.2, size=s).astype(np.float32))
    w = {"model.embed_tokens.weight": g(V, D), "model.norm.weight": 1 + g(D)}
    for i in range(L):
        q = f"model.layers.{i}."
        w |= {
            q + "input_layernorm.weight": 1 + g(D),
            q + "post_attention_layernorm.weight": 1 + g(D),
            q + "self_attn.q_proj.weight": g(D, D),
            q + "self_attn.k_proj.weight": g(D // 2, D),
            q + "self_attn.v_proj.weight": g(D // 2, D),
            q + "self_attn.o_proj.weight": g(D, D),
            q + "mlp.gate_proj.weight": g(F, D),
            q + "mlp.up_proj.weight": g(F, D),
            q + "mlp.down_proj.weight": g(D, F),
        }
    save_file(w, str(path / "model.safetensors"))
    return path


def reserialise_tokenizer(path) -> None:
    """Rewrite tokenizer.json as another transformers release might: other whitespace, other key
    order, merges as lists instead of "a b" strings."""
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["model"]["merges"] = [m.split(" ") for m in tok["model"]["merges"]]
    rng = random.Random(1)

    def shuffle(o):
        if isinstance(o, dict):
            items = [(k, shuffle(v)) for k, v in o.items()]
            rng.shuffle(items)
            return dict(items)
        return [shuffle(v) for v in o] if isinstance(o, list) else o

    (path / "tokenizer.json").write_text(json.dumps(shuffle(tok), indent=7) + "\n\n")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated cache and HOME."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMFS_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def lm_store(
    tmp_path, spec: str, legacy: bool = False, format_2: bool = False, format_3: bool = False, dictionary=None
):
    """A store whose files' blocks are LM containers of `spec` (the test model codes nothing
    smaller than zstd, so the containers are swapped in directly, as compaction would). legacy:
    a format 1 store (no model files) whose blocks carry the fingerprint releases up to 16af6cc
    gave the model, as main at 16af6cc left it. format_2: a format 2 store, as the releases
    before compact LM blocks left it (full version 2 containers, no modelnums table). format_3:
    a format 3 store (compact LM blocks, no dictnums table). dictionary: what the blocks continue
    (stored in the meta table, as `tune` does)."""
    Store.create(str(tmp_path / "s"), BS, spec)
    s = Store(str(tmp_path / "s"))
    fs = ns.Filesystem(s, Registry())
    for name, data in TEXTS.items():
        fh = fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
        fs.write(fh, data, 0)
        fs.release(fh)
    fs.flush_all()
    models = Models(s)
    codec = models._spec_codec(spec) if legacy else models.compaction_codec()
    fp = codec.fingerprint
    if legacy:
        fp = sorted(codec.fingerprints - {codec.fingerprint})[0]
    if legacy:  # releases before LM payload version 4 named no dictionary
        codec.use_dictionary(None)
    elif dictionary is not None:  # "default": the codec's built-in one
        dictionary = codec.default_dictionary if dictionary == "default" else dictionary
        codec.use_dictionary(dictionary)
    reg = Registry()
    with s.write() as t:
        if legacy or format_2 or format_3:  # tables the older releases did not have
            t.txn.drop(t.db.pop("dictnums"), delete=True)
        if legacy or format_2:  # blocks as the older release stored them: full containers
            t.txn.drop(t.db.pop("modelnums"), delete=True)
        if dictionary is not None:
            t.put_dictionary(dictionary.id, dictionary.blob)
        for h, blob in list(t.blocks()):
            data = reg.decode(blob)
            t.replace_container(
                h, container.pack(LM, len(data), container.checksum(data), codec.encode_payload(data), fp)
            )
        t.add_model(fp, spec)
        if legacy:
            for n in DB_NAMES_V2[len(DB_NAMES_V1) :]:
                t.txn.drop(t.db.pop(n), delete=True)
            t.set_meta("format", (1).to_bytes(4, "big"))
        elif format_2:
            t.set_meta("format", (2).to_bytes(4, "big"))
        elif format_3:
            t.set_meta("format", (3).to_bytes(4, "big"))
    s.close()
    return str(tmp_path / "s"), fp


def read_all(store_path: str, lock: bool = True) -> dict[bytes, bytes]:
    s = Store(store_path, lock=lock)
    try:
        models = Models(s)
        fs = ns.Filesystem(s, Registry(model_resolver=models.resolve))
        out = {}
        for name in TEXTS:
            out[name] = fs.read_ino(fs.lookup(ROOT_INO, name), 1 << 20, 0)
        return out
    finally:
        s.close()


def lm_fingerprints(store_path: str) -> set[bytes]:
    s = Store(store_path, lock=False, readonly=True)
    try:
        with s.read() as t:
            return {peek_header(b[:64]).fingerprint for _, b in t.blocks()}
    finally:
        s.close()


def test_blocks_decode_without_cache_home_or_source(env, monkeypatch):
    """The issue's demonstration: LM blocks written, then the conversion cache removed, HOME
    changed, the tokenizer JSON re-serialised (and then the model directory gone): every block
    still decodes, from the store alone, and nothing is converted again."""
    model = write_model_dir(env / "model")
    path, fp = lm_store(env, str(model))
    assert lm_fingerprints(path) == {fp}
    shutil.rmtree(env / "cache")
    monkeypatch.setenv("HOME", str(env / "elsewhere"))
    reserialise_tokenizer(model)
    monkeypatch.setattr(loader, "convert", lambda p: pytest.fail("decoding converted a model"))
    assert read_all(path) == TEXTS
    shutil.rmtree(model)
    assert read_all(path) == TEXTS
    assert fsck.run_checks(Store(path))[0] == []


def test_fingerprint_survives_tokenizer_reserialisation(env):
    model = write_model_dir(env / "model")
    before = loader.model_file(str(model))
    reserialise_tokenizer(model)
    after = loader.model_file(str(model), cache_dir=str(env / "other-cache"))
    assert after.fingerprint == before.fingerprint
    strip = lambda m: {k: v for k, v in m.items() if k != "aliases"}
    assert strip(after.manifest) == strip(before.manifest)
    # the fingerprint releases up to 16af6cc computed (from the JSON text) moved; it is an alias
    assert before.fingerprints - {before.fingerprint} != after.fingerprints - {after.fingerprint}


def test_model_file_is_verified(env):
    model = write_model_dir(env / "model")
    mf = loader.model_file(str(model))
    blob = bytearray(mf.blob)
    blob[len(blob) // 2] ^= 1
    with pytest.raises(modelfile.BadModelFile):
        modelfile.parse(blob, mf.digest)
    codec = codec_of(modelfile.parse(bytearray(mf.blob), mf.digest))
    assert codec.fingerprint == mf.fingerprint


def test_format_1_store_opens_upgrades_and_embeds(env):
    """A store as main at 16af6cc left it (format 1, blocks with the old fingerprint, no model
    files): read as is without the lock, upgraded with it; its blocks decode through the model's
    spec and the alias; fsck --repair stores the model; then the source may go."""
    model = write_model_dir(env / "model")
    path, fp = lm_store(env, str(model), legacy=True)
    ro = Store(path, lock=False, readonly=True)
    assert ro.format == 1
    ro.close()
    s = Store(path)
    assert s.format == FORMAT_VERSION
    problems, _ = fsck.run_checks(s, fsck.QUICK_CHECKS)
    assert problems == []  # a mount after a crash is not refused for an unembedded model
    problems, _ = fsck.run_checks(s)
    assert [p.check for p in problems] == ["model_embedding"]
    fsck.run_checks(s, repair=True)
    assert fsck.run_checks(s)[0] == []
    assert any("decodable here (embedded)" in line for line in model_report(s))
    s.close()
    shutil.rmtree(model)
    shutil.rmtree(env / "cache")
    assert read_all(path) == TEXTS


def test_format_2_store_opens_upgrades_and_compacts(env):
    """A store the previous release made (format 2, full version 2 LM containers): read as is
    without the lock; upgraded to format 3 with it, its blocks unchanged and fsck clean; a block
    re-stored then is kept compact (20 bytes smaller here: magic, version, codec id, checksum and
    fingerprint against a one-byte tag and a one-byte model number), and everything still reads,
    verified against the key, with fsck clean."""
    model = write_model_dir(env / "model")
    path, fp = lm_store(env, str(model), format_2=True)
    ro = Store(path, lock=False, readonly=True)
    assert ro.format == 2 and "modelnums" not in ro.db
    ro.close()
    assert read_all(path, lock=False) == TEXTS
    s = Store(path)
    assert s.format == FORMAT_VERSION
    with s.read() as t:
        full = {h: (blob, t.stored_size(h)) for h, blob in t.blocks()}
    assert all(len(blob) == size and blob[:5] == b"LMFZ\x02" for blob, size in full.values())
    assert fsck.run_checks(s)[0] == []
    with s.write() as t:
        for h, (blob, _size) in full.items():
            t.replace_container(h, blob)
        assert t.model_numbers() == {0: fp}
    with s.read() as t:
        for h, (_blob, size) in full.items():
            assert t.stored_size(h) == size - 20
            keyed = t.container(h)
            assert keyed[:5] == b"LMFZ\x03" and peek_header(keyed).key == h
    assert fsck.run_checks(s)[0] == []
    s.close()
    assert read_all(path) == TEXTS


def test_format_3_store_upgrades_and_numbers_its_dictionary(env):
    """A store the previous release made (format 3: compact LM blocks that carry their
    dictionary's 8-byte id, no dictnums table): read as is without the lock; upgraded to format 4
    with it, its blocks unchanged and fsck clean; a block re-stored then keeps a store-local
    dictionary number instead of the id (7 bytes smaller: a one-byte number for eight), and every
    reader still gets the id back in the keyed container — the payload as the codec wrote it,
    decodable outside the store — verified against the key, fsck clean. A lost dictnums entry is
    the table's damage: fsck reports it and never quarantines the block."""
    from llmfs.codec.lm.codec import payload_dictionary

    model = write_model_dir(env / "model")
    path, fp = lm_store(env, str(model), format_3=True, dictionary="default")
    ro = Store(path, lock=False, readonly=True)
    assert ro.format == 3 and "dictnums" not in ro.db
    with ro.read() as t:
        (did,) = t.dictionaries()
        at_rest = {bytes(h): bytes(t.txn.get(h, db=t.db["blocks"])) for h, _blob in t.blocks()}
    ro.close()
    assert len(at_rest) == len(TEXTS)
    assert {b[0] for b in at_rest.values()} == {container.COMPACT_TAG}
    assert read_all(path, lock=False) == TEXTS
    s = Store(path)
    assert s.format == FORMAT_VERSION
    with s.read() as t:
        keyed = {h: bytes(blob) for h, blob in t.blocks()}
        assert {h: t.stored_size(h) for h in keyed} == {h: len(b) for h, b in at_rest.items()}
    assert fsck.run_checks(s)[0] == []
    with s.write() as t:
        for h, blob in keyed.items():
            t.replace_container(h, blob)
        assert t.dictionary_numbers() == {0: did}
    with s.read() as t:
        for h, blob in keyed.items():
            assert t.stored_size(h) == len(at_rest[h]) - 7
            assert t.txn.get(h, db=t.db["blocks"])[0] == container.COMPACT_DICT_TAG
            again = t.container(h)
            assert again == blob and peek_header(again).key == h
            assert payload_dictionary(again[peek_header(again).payload_offset :]) == did
    assert fsck.run_checks(s)[0] == []
    with s.write() as t:
        t.txn.delete((0).to_bytes(4, "big"), db=t.db["dictnums"])
        t.txn.put((1).to_bytes(4, "big"), b"\xff" * 8, db=t.db["dictnums"])  # 0: lost, not unused
    problems = fsck.run_checks(s, repair=True)[0]
    lost = [p for p in problems if "dictnums table has lost" in p.message]
    assert len(lost) == len(TEXTS) and all(p.repair is None for p in lost)
    with s.read() as t:  # repair left the blocks as they were
        assert {h: bytes(t.txn.get(h, db=t.db["blocks"]))[0] for h in keyed} == dict.fromkeys(keyed, 2)
    with s.write() as t:
        t.txn.put((0).to_bytes(4, "big"), did, db=t.db["dictnums"])
    fsck.run_checks(s, repair=True)  # the counters left them out
    assert fsck.run_checks(s)[0] == []
    s.close()
    assert read_all(path) == TEXTS


@pytest.mark.parametrize("made_by", ["format_2", "format_3"])
def test_recode_keeps_blocks_of_an_upgraded_store_short(env, made_by):
    """`llmfs compact --recode` on a store an older release made, whose LM blocks are already
    coded by the current model (nothing to re-encode): every block the older format kept longer —
    format 2's full containers, format 3's compact blocks that carry the dictionary's 8-byte id —
    is rewritten in this format's short form without the model (27 bytes less each for format 2:
    20 of header and the id's 7; 7 for format 3);
    the counters follow (fsck clean), every reader gets the same container, and a second recode
    finds nothing left."""
    from llmfs.compact import recode_offline

    model = write_model_dir(env / "model")
    path, _fp = lm_store(env, str(model), dictionary="default", **{made_by: True})
    s = Store(path)  # upgraded in place, its blocks as they were
    with s.read() as t:
        before = {h: (blob, t.stored_size(h)) for h, blob in t.blocks()}
        stored = t.counters.stored
    s.close()
    res = recode_offline(path, None, lambda done, total: None)
    saved = 27 if made_by == "format_2" else 7
    assert res.blocks == len(before) == len(TEXTS) and res.changed == 0
    assert res.saved == saved * len(before)
    s = Store(path)
    with s.read() as t:
        for h, (blob, size) in before.items():
            assert t.stored_size(h) == size - saved
            assert t.txn.get(h, db=t.db["blocks"])[0] == container.COMPACT_DICT_TAG
            again = t.container(h)
            assert (
                peek_header(again).key == h
                and again[peek_header(again).payload_offset :] == (blob[peek_header(blob).payload_offset :])
            )
        assert t.counters.stored == stored - res.saved
    assert fsck.run_checks(s)[0] == []
    s.close()
    assert read_all(path) == TEXTS
    assert recode_offline(path, None, lambda done, total: None).blocks == 0


def test_newer_store_format_is_refused(env):
    Store.create(str(env / "s"), BS)
    s = Store(str(env / "s"))
    with s.write() as t:
        t.set_meta("format", (FORMAT_VERSION + 1).to_bytes(4, "big"))
    s.close()
    with pytest.raises(UnsupportedFormat, match="install a newer llmfs"):
        Store(str(env / "s"))


def test_unknown_engine_version_refuses_to_start(env):
    """A store holding a model of an engine version this release lacks: Models (mount, compact)
    refuses with a message naming the release to install; fsck/stat report it."""
    e = Engine.tiny()
    from llmfs.codec.lm.tokenizer import ByteTokenizer

    blob = loader.make_model_file(e.config, e.tensors, ByteTokenizer())
    mf = modelfile.parse(bytearray(blob))
    manifest = dict(mf.manifest, engine_version=99, written_by="llmfs 9.0.0")
    blob = modelfile.build(manifest, mf.tensors)
    Store.create(str(env / "s"), BS, "tiny")
    s = Store(str(env / "s"))
    with s.write() as t:
        t.put_model_file(modelfile.digest(blob), blob, [mf.fingerprint])
        t.add_model(mf.fingerprint, "tiny")
    with pytest.raises(UndecodableStore, match=r"version 99.*install llmfs 9\.0\.0"):
        Models(s)
    assert "NOT decodable" in model_report(s)[0]
    with pytest.raises(engines.UnsupportedEngine):
        codec_of(modelfile.parse(bytearray(blob)))
    s.close()


def test_current_engine_version_is_supported():
    assert engines.current_version() in engines.SUPPORTED


def test_cache_is_trusted_only_when_ours_and_intact(env, monkeypatch):
    model = write_model_dir(env / "model")
    cache = env / "cache"
    mf = loader.model_file(str(model))
    [cached] = cache.glob("*.llmfsmodel")
    assert cached.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    calls = []
    real = loader.convert
    monkeypatch.setattr(loader, "convert", lambda p: calls.append(p) or real(p))
    assert loader.model_file(str(model)).digest == mf.digest and not calls
    os.chmod(cached, 0o666)  # writable by others: not trusted
    assert loader.model_file(str(model)).digest == mf.digest and len(calls) == 1
    assert cached.stat().st_mode & 0o777 == 0o600  # rewritten by us
    calls.clear()
    euid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: euid + 1)  # someone else's cache
    assert loader.model_file(str(model)).digest == mf.digest and len(calls) == 1
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    calls.clear()
    with open(cached, "r+b") as f:  # content that does not match its hash
        f.seek(cached.stat().st_size // 2)
        f.write(b"\x55" * 16)
    assert loader.model_file(str(model)).digest == mf.digest and len(calls) == 1
    calls.clear()
    os.chmod(cache, 0o777)  # a world-writable directory: used not at all
    assert loader.model_file(str(model)).digest == mf.digest and len(calls) == 1
    calls.clear()
    assert loader.model_file(str(model)).digest == mf.digest and len(calls) == 1


def test_recode_moves_blocks_to_the_current_model_and_retires_the_old(env):
    """compact --recode: blocks of another model are re-encoded with the store's current one
    (verified), and the model files no block needs any more are dropped."""
    from llmfs.compact import recode_offline

    old = write_model_dir(env / "old", seed=1)
    new = write_model_dir(env / "new", seed=2)
    path, old_fp = lm_store(env, str(old))
    s = Store(path)
    with s.write() as t:
        t.set_meta("model", str(new).encode())
    s.close()
    res = recode_offline(path, None, lambda done, total: None)
    assert res.blocks > 0 and res.changed == 0
    fps = lm_fingerprints(path)
    assert old_fp not in fps  # (the random test model loses to zstd: the blocks are zstd now)
    s = Store(path)
    with s.read() as t:
        assert old_fp not in t.model_keys() and len(t.model_file_digests()) == 1
    s.close()
    shutil.rmtree(old)
    assert read_all(path) == TEXTS


# ---- the engine's frequencies are data ----------------------------------------------------------

# sha256 of the int32 frequency rows of Engine.tiny(seed=0) (engine version 5) on FREQ_TEXT. A
# change to any of them changes what version 5 blocks decode to: it must be a new engine version.
FREQ_TEXT = "Golden frequencies: ÿ 中文 Кириллица\n\tdef f(): return 1\n".encode()
TINY_V5_FREQS_SHA256 = "e028710d575d84e7088d82e2cb5561277d96e19f403aa5bc5720bb576bbeaa8b"


@pytest.mark.parametrize("fused", [None, False])
def test_engine_v5_frequencies_do_not_change(fused):
    """Pinned at main 2fa6d7d (engine v5), for the C kernels (where they build) and TorchOps."""
    tiny = Engine.tiny(seed=0)
    e = (
        engines.build(5, tiny.config, tiny.tensors)
        if fused is None
        else Engine(tiny.config, tiny.tensors, fused=False)
    )
    tokens = torch.tensor([[e.bos_id] + list(FREQ_TEXT)])
    got = hashlib.sha256(e.freqs(tokens).numpy().astype("<i4").tobytes()).hexdigest()
    assert got == TINY_V5_FREQS_SHA256
