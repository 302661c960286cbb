"""The store dictionary (codec/lm/dictionary.py, payload version 4): a priming context whose KV
state (engine.Engine.prefix) is computed once and continued by every segment.

Exactness first: a prefix's cached keys must be the integers the engine computes for those tokens
in one pass, on every backend, in the parallel encoder pass (hidden(prefix=)) and in the stepped
decoder (reset_rows(prefix=)). All on the tiny models (seconds)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from llmfs.codec.container import ChecksumMismatch, ContainerError, ModelMismatch
from llmfs.codec.lm import backend, coder, dictionary, kernels
from llmfs.codec.lm.codec import LMCodec, payload_dictionary
from llmfs.codec.lm.engine import Engine
from llmfs.codec.lm.tokenizer import ByteTokenizer

from tests.lm_helpers import tiny_engine
from tests.test_forever import TEXTS, lm_store, read_all, write_model_dir
from tests.test_lm_codec import TEXT
from tests.test_lm_mixer import LOG


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


# -- the codec: payload version 4 ---------------------------------------------------------------


def _codec(engine=None, **kw) -> LMCodec:
    kw.setdefault("segment_tokens", 64)
    return LMCodec((engine or tiny_engine(), ByteTokenizer()), **kw)


def test_version4_and_5_round_trip_beside_older_versions():
    c = _codec(dictionary="default")
    assert c.dictionary is c.default_dictionary and len(c.dictionary.tokens) == 256 // 4
    data = TEXT * 2 + LOG
    v5 = c.encode_payload(data)
    assert v5[0] == 5 and payload_dictionary(v5[:16]) == c.dictionary.id
    c.version = 4
    v4 = c.encode_payload(data)
    assert v4[0] == 4 and v4[1:9] == c.dictionary.id and payload_dictionary(v4[:16]) == c.dictionary.id
    c.version = 3
    v3 = c.encode_payload(data)
    c.version = 2
    v2 = c.encode_payload(data)
    assert v3[0] == 3 and v2[0] == 2
    for batch in (1, 3, 64):
        d = _codec(batch=batch)  # decodes the built-in default without using it
        assert d.dictionary is None
        assert (
            d.decode_many(
                [(v2, len(data)), (v4, len(data)), (v3, len(data)), (v5, len(data)), (v4, len(data))]
            )
            == [data] * 5
        )
    # a codec without a dictionary writes version 5 without one; asked for 4, it writes 3
    plain = _codec()
    assert plain.encode_payload(data)[0] == 5 and payload_dictionary(plain.encode_payload(data)) is None
    plain.version = 4
    assert plain.encode_payload(data)[0] == 3 and payload_dictionary(v3) is None


def test_version4_independent_of_batch_chunks_and_threads(monkeypatch):
    data = TEXT * 2 + LOG
    d = dictionary.choose([TEXT, LOG, LOG[:300] + TEXT], ByteTokenizer(), 256)
    payloads = {_codec(batch=b, dictionary=d).encode_payload(data) for b in (1, 16)}
    monkeypatch.setattr(coder, "ENCODE_CHUNK_ROWS", 7)
    payloads.add(_codec(dictionary=d).encode_payload(data))
    monkeypatch.undo()
    assert len(payloads) == 1
    (payload,) = payloads
    reader = _codec(batch=2)
    with pytest.raises(ModelMismatch):  # a dictionary the reader does not hold
        reader.decode_many([(payload, len(data))])
    reader.add_dictionary(dictionary.parse(d.blob))
    assert reader.decode_many([(payload, len(data))]) == [data]


def test_a_dictionary_extension_primes_the_mixer_with_the_store_text():
    """DICT_FORMAT 2: `choose` adds the samples' last tokens as an extension that only the mixer
    learns (before the dictionary's tokens): text that repeats a sample beyond what the
    dictionary's own tokens hold then codes smaller than with the same dictionary without it.
    The extension is part of the dictionary's bytes and id (a dictionary without one serializes
    as format 1, as before); payloads round-trip at any batch, and their bytes are pinned."""
    samples = [LOG[i * 150 : i * 150 + 300] for i in range(6)]
    d = dictionary.choose(samples, ByteTokenizer(), 256, limit=32)
    assert len(d.tokens) == 32 and d.extension == tuple(b"".join(samples)[-dictionary.EXTENSION_TOKENS :])
    assert d.primer == d.extension + d.tokens
    assert d.blob[0] == dictionary.DICT_FORMAT_EXTENDED and dictionary.parse(d.blob) == d
    bare = dictionary.Dictionary(d.tokens)
    assert bare.blob[0] == dictionary.DICT_FORMAT and bare.id != d.id
    with pytest.raises(ChecksumMismatch):  # a reader refuses an extension longer than it accepts
        dictionary.parse(dictionary.Dictionary((1,), (2,) * (dictionary.MAX_EXTENSION + 1)).blob)
    data = samples[2] + samples[4]  # the store's text again, beyond the dictionary's 32 tokens
    extended = _codec(dictionary=d).encode_payload(data)
    assert len(extended) < 0.6 * len(_codec(dictionary=bare).encode_payload(data))
    for batch in (1, 4, 64):
        reader = _codec(batch=batch)
        reader.add_dictionary(dictionary.parse(d.blob))
        assert reader.decode_many([(extended, len(data)), (extended, len(data))]) == [data, data]
    assert hashlib.sha256(extended).hexdigest() == PINNED_EXTENDED, hashlib.sha256(extended).hexdigest()


PINNED_EXTENDED = "3582158cc9ca832e0435b9c99d82c1caab5d146ce62aafc3cb1e2d2754c78667"


def test_store_dictionary_makes_repeats_cheaper_from_the_first_token():
    """Small files that share headers: a dictionary chosen from similar data codes them smaller
    than no dictionary (the tiny random model knows nothing; the primed mixer does)."""
    files = [LOG[i * 40 : i * 40 + 300] for i in range(6)]
    d = dictionary.choose(files[:4], ByteTokenizer(), 256)
    plain, primed = _codec(), _codec(dictionary=d)
    a = sum(len(plain.encode_payload(f)) for f in files[4:])
    b = sum(len(primed.encode_payload(f)) for f in files[4:])
    assert b < 0.8 * a


@pytest.mark.parametrize("name, engine", _engines(), ids=lambda x: x if isinstance(x, str) else "")
def test_version4_same_words_on_every_backend(name, engine):
    """Encoder (parallel pass after the prefix) and decoder (stepped rows) on each forced backend
    give the words of the torch engine."""
    data = TEXT + LOG
    want = _codec(_engines()[0][1], dictionary="default").encode_payload(data)
    c = _codec(engine, dictionary="default", batch=5)
    assert c.encode_payload(data) == want
    assert c.decode_many([(want, len(data))]) == [data]


def test_dictionary_blob_and_default_are_pinned():
    d = dictionary.default(ByteTokenizer(), 4096)
    assert bytes(d.tokens) == dictionary.DEFAULT_TEXT.encode()[: dictionary.DEFAULT_TOKENS]
    assert dictionary.parse(d.blob) == d
    assert d.id.hex() == PINNED_DEFAULT_ID
    for bad in (b"", b"\x02\x01\x05", b"\x01\x00", b"\x01\x02\x05", b"\x01\x01\x05\x00"):
        with pytest.raises(ContainerError):
            dictionary.parse(bad)


PINNED_DEFAULT_ID = "3d49cd1d4f66dea2"


# -- the store: dictionaries held, tuned, applied by --recode, checked by fsck --------------------


def _lm_dictionaries(path: str) -> dict[bytes, bytes | None]:
    """block hash -> the dictionary id its LM payload names (LM blocks only)."""
    from llmfs.codec.lm.codec import payload_dictionary
    from llmfs.codec.registry import LM, peek_header

    from llmfs.store import Store

    s = Store(path, lock=False, readonly=True)
    try:
        with s.read() as t:
            out = {}
            for h, b in t.blocks():
                head = peek_header(bytes(b))
                if head.codec_id == LM:
                    out[bytes(h)] = payload_dictionary(bytes(b)[head.payload_offset :])
            return out
    finally:
        s.close()


def _problems(path: str) -> list:
    from llmfs import fsck
    from llmfs.store import Store

    s = Store(path)
    try:
        return [p.check for p in fsck.run_checks(s, fsck.CHECKS)[0]]
    finally:
        s.close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated cache and HOME (as test_forever's)."""
    monkeypatch.setenv("LLMFS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_tune_weighs_a_dictionary_against_its_stored_bytes(env):
    """A dictionary that codes the held-out files smaller is still not worth it in a store too
    small to repay its own bytes (its extension makes it several KB): `tune` keeps what the store
    has and says why; --force stores it."""
    from llmfs.codec import Registry

    from llmfs import namespace as ns
    from llmfs.store import ROOT_INO, Store
    from llmfs.tune import tune

    model = write_model_dir(env / "model")
    Store.create(str(env / "s"), 4096, str(model))
    s = Store(str(env / "s"))
    fs = ns.Filesystem(s, Registry())
    for i in range(8):  # 4,800 bytes of log lines: the dictionary saves, but less than it takes
        fh = fs.create(ROOT_INO, f"log{i}".encode(), 0o644, os.O_RDWR, 0, 0)
        fs.write(fh, (LOG * 3)[i * 97 : i * 97 + 600], 0)
        fs.release(fh)
    fs.flush_all()
    s.close()
    said = tune(str(env / "s"))
    assert "would save about" in said and "kept no dictionary" in said, said
    s = Store(str(env / "s"), lock=False, readonly=True)
    with s.read() as t:
        assert t.current_dictionary() is None and t.dictionaries() == {}
    s.close()
    assert "now current" in tune(str(env / "s"), force=True)


def test_store_holds_tunes_recodes_and_checks_its_dictionary(env):
    """Blocks of an untuned store name no dictionary; `tune` stores one chosen from the files and
    makes it current, every LM block becomes a recode candidate and `compact --recode` recodes
    them; blocks that name it decode from the store; fsck reports a block whose dictionary is
    gone; `tune --default` makes the built-in one current."""
    from llmfs.codec import Registry, container
    from llmfs.codec.registry import LM

    from llmfs.compact import recode_offline
    from llmfs.compactor import Compactor
    from llmfs.models import Models, store_spec
    from llmfs.store import Store
    from llmfs.tune import tune

    model = write_model_dir(env / "model")
    path, fp = lm_store(env, str(model))
    named = _lm_dictionaries(path)
    assert len(named) == len(TEXTS) and set(named.values()) == {None}  # version 3
    assert _problems(path) == []

    assert "kept no dictionary" in tune(path)  # from en.txt and ru.txt, measured on code.py
    s = Store(path, lock=False, readonly=True)
    with s.read() as t:
        assert t.current_dictionary() is None
    s.close()
    assert "now current" in tune(path, force=True)
    s = Store(path)
    with s.read() as t:
        cur = t.current_dictionary()
        assert cur is not None and cur in t.dictionaries()
    models = Models(s)
    compactor = Compactor(s, Registry(model_resolver=models.resolve), models.compaction_codec, store_spec(s))
    assert sorted(compactor.recode_candidates()) == sorted(named)  # every block: another dictionary
    s.close()
    res = recode_offline(path, None, lambda done, total: None)
    assert res.blocks == len(named)
    assert set(_lm_dictionaries(path).values()) <= {cur}  # (the random model may lose to zstd)
    assert read_all(path) == TEXTS

    s = Store(path)  # LM blocks that continue the store's dictionary, as compaction writes them
    models = Models(s)
    codec = models.compaction_codec()
    assert codec.dictionary.id == cur
    reg = Registry(model_resolver=models.resolve)
    with s.write() as t:
        for h, blob in list(t.blocks()):
            data = reg.decode(blob)
            payload = codec.encode_payload(data)
            t.replace_container(h, container.pack(LM, len(data), container.checksum(data), payload, fp))
        held = t.dictionaries()
    s.close()
    assert set(_lm_dictionaries(path).values()) == {cur}
    assert read_all(path) == TEXTS
    assert _problems(path) == []
    s = Store(path)  # the store loses the dictionary: fsck says which blocks cannot decode
    with s.write() as t:
        t.txn.delete(b"dict:" + cur.hex().encode(), db=t.db["meta"])
    s.close()
    assert set(_problems(path)) == {"dictionaries", "block_checksums"}
    s = Store(path)
    with s.write() as t:
        t.put_dictionary(cur, held[cur])
    s.close()
    assert _problems(path) == []
    assert "already current" in tune(path, force=True)  # the same files choose the same one
    assert "built in" in tune(path, default=True)


def test_tune_holds_samples_back_and_measures_with_them():
    """`llmfs tune` chooses from three of every four samples and keeps a dictionary only if it
    codes the fourth ones smaller than the current state: on files that share their lines it does,
    on unrelated ones it does not."""
    from llmfs.tune import coded_size, split_samples

    assert split_samples([b"a"]) == ([b"a"], [])
    assert split_samples([b"a", b"b", b"c"]) == ([b"a", b"b"], [b"c"])
    train, held = split_samples([bytes([i]) for i in range(9)])
    assert held == [b"\x03", b"\x07"] and len(train) == 7
    c = _codec()
    files = [LOG[i * 40 : i * 40 + 300] for i in range(8)]
    train, held = split_samples(files)
    d = dictionary.choose(train, c.tokenizer, c.engine.max_seq_len)
    assert coded_size(c, d, held) < coded_size(c, None, held)
    assert c.dictionary is None  # coded_size puts the codec back as it was


# -- several dictionaries per store: classes, the encoder's pick, the decoder following ----------

RU = (
    "Съешь же ещё этих мягких французских булок, да выпей чаю. В чащах юга жил бы цитрус? Да, "
    "но фальшивый экземпляр! Широкая электрификация южных губерний даст мощный толчок подъёму "
    "сельского хозяйства. Любя, съешь щипцы, — вздохнёт мэр, — кайф жгуч. "
).encode()
ZH = (
    "我能吞下玻璃而不伤身体。天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。寒来暑往，秋收冬藏。"
    "闰余成岁，律吕调阳。云腾致雨，露结为霜。金生丽水，玉出昆冈。剑号巨阙，珠称夜光。"
).encode()
KINDS = {  # three kinds of text (their bytes share few pairs), five 300-byte samples each
    "log": [LOG[i * 97 : i * 97 + 300] for i in range(5)],
    "ru": [(RU * 3)[i * 61 : i * 61 + 300] for i in range(5)],
    "zh": [(ZH * 3)[i * 45 : i * 45 + 300] for i in range(5)],
}


def _kind_classes(c: LMCodec) -> tuple[dictionary.Classes, list[str]]:
    """Classes of the first four samples of each kind (mixed in one list, as a store's files
    come), each class's dictionary chosen from all its samples — without an extension (format 1
    dictionaries: the bytes PINNED_CLASSES pins are what releases before extensions wrote); and
    the kind of each class."""
    order = [(k, s) for i in range(4) for k, v in KINDS.items() for s in v[i : i + 1]]
    samples = [s for _, s in order]
    tokens = [c.tokenizer.encode(s) for s in samples]
    groups = dictionary.classes(tokens)
    kinds = []
    for g in groups:
        assert len({order[i][0] for i in g}) == 1  # a class holds one kind of text
        kinds.append(order[g[0]][0])
    assert sorted(kinds) == sorted(KINDS) and groups == dictionary.classes(tokens)  # deterministic
    return (
        dictionary.Classes(
            tuple(dictionary.profile([tokens[i] for i in g]) for g in groups),
            tuple(
                dictionary.choose([samples[i] for i in g], c.tokenizer, c.engine.max_seq_len, extension=0)
                for g in groups
            ),
        ),
        kinds,
    )


def test_classes_separate_kinds_and_blocks_pick_their_own():
    """tune's classes keep kinds apart; a new block of each kind picks its kind's dictionary, a
    block like none of them (or of a class whose dictionary did not pay) picks none; the classes'
    blob round-trips and a damaged one, or one naming a dictionary not held, is refused."""
    c = _codec()
    classes, kinds = _kind_classes(c)
    for i, kind in enumerate(kinds):
        assert classes.pick(c.tokenizer.encode(KINDS[kind][4])) is classes.dictionaries[i]
    noise = bytes(torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(1)).tolist())
    assert classes.pick(c.tokenizer.encode(noise)) is None
    assert classes.pick([]) is None
    held = {d.id: d for d in classes.dictionaries}
    assert dictionary.parse_classes(classes.blob, held) == classes
    without = dictionary.Classes(classes.profiles, (None,) + classes.dictionaries[1:])
    assert without.pick(c.tokenizer.encode(KINDS[kinds[0]][4])) is None
    assert dictionary.parse_classes(without.blob, held) == without
    blob = classes.blob
    for bad in (b"", b"\x02" + blob[1:], blob + b"\x00", blob[:-1], b"\x01\x09"):
        with pytest.raises(ContainerError):
            dictionary.parse_classes(bad, held)
    with pytest.raises(ContainerError):
        dictionary.parse_classes(blob, {})


def test_blocks_continue_their_class_dictionary_and_decode_together():
    """With classes the encoder names each block's pick; the words are exactly those of a codec
    given that one dictionary (the pick only chooses), whatever the batch; one decode_many call
    decodes blocks of different dictionaries and of none side by side. The bytes are pinned."""
    c = _codec()
    classes, kinds = _kind_classes(c)
    c.use_classes(classes)
    noise = bytes(torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(1)).tolist())
    blocks = [KINDS[k][4] * 2 for k in kinds] + [noise]
    payloads = [c.encode_payload(b) for b in blocks]
    for i, p in enumerate(payloads[:-1]):
        d = classes.dictionaries[i]
        assert payload_dictionary(p) == d.id
        assert _codec(dictionary=d, batch=1).encode_payload(blocks[i]) == p
    assert payload_dictionary(payloads[-1]) is None
    assert payloads[-1] == _codec().encode_payload(noise)
    c.use_dictionary(None)  # drops the classes
    assert c.classes is None and payload_dictionary(c.encode_payload(blocks[0])) is None
    items = [(p, len(b)) for p, b in zip(payloads, blocks)]
    for batch in (1, 4, 64):
        reader = _codec(batch=batch)
        for d in classes.dictionaries:
            reader.add_dictionary(dictionary.parse(d.blob))
        assert reader.decode_many(items + items[::-1]) == blocks + blocks[::-1]
    digest = hashlib.sha256(b"".join(payloads)).hexdigest()
    assert digest == PINNED_CLASSES, digest


PINNED_CLASSES = "8d2b7b77cda9620c5561cf8315c104a0fa04f3eb9cd0ee049cbd329da0b38208"


def _kinds_store(env) -> tuple[str, bytes, dict[bytes, bytes]]:
    """An LM store (the random test model) holding a file of each sample of KINDS: its path,
    the model's fingerprint, and the files by name."""
    from llmfs.codec import Registry

    from llmfs import namespace as ns
    from llmfs.namespace import ROOT_INO
    from llmfs.store import Store

    model = write_model_dir(env / "model")
    path, fp = lm_store(env, str(model))
    s = Store(path)
    fs = ns.Filesystem(s, Registry())
    files = {f"{kind}{i}".encode(): data for kind, samples in KINDS.items() for i, data in enumerate(samples)}
    for name, data in files.items():
        fh = fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
        fs.write(fh, data, 0)
        fs.release(fh)
    fs.flush_all()
    s.close()
    return path, fp, files


def test_tune_keeps_classes_only_where_they_pay_for_their_bytes(env, monkeypatch):
    """Classes cost their profiles and dictionaries in the store whatever its size: `tune`
    stores them only if the saving measured on held-out files, projected onto the store's bytes,
    exceeds that cost (the saving is set here: the random test model cannot make one pay)."""
    from llmfs import tune as tune_mod
    from llmfs.store import Store

    path, _fp, _files = _kinds_store(env)
    real = tune_mod.tune_classes

    def measured(saved, held):
        def fake(codec, samples, groups, force=False):
            classes, lines, _held, _saved = real(codec, samples, groups, force=True)
            return classes, lines, held, saved

        return fake

    monkeypatch.setattr(tune_mod, "tune_classes", measured(saved=1, held=1 << 20))
    said = tune_mod.tune(path)
    assert "take" in said and "kept what the store has" in said, said
    s = Store(path)
    with s.read() as t:
        assert t.dictionary_classes() is None and t.current_dictionary() is None
    s.close()
    monkeypatch.setattr(tune_mod, "tune_classes", measured(saved=1 << 20, held=1))
    said = tune_mod.tune(path)
    assert "dictionaries are now current" in said, said
    s = Store(path)
    with s.read() as t:
        assert t.dictionary_classes() is not None
    s.close()
    assert tune_mod.classes_pay(100, 1000, 10**6, 5000) == (True, 100000)
    assert tune_mod.classes_pay(100, 1000, 10**4, 5000) == (False, 1000)


def test_store_tunes_one_dictionary_per_class(env):
    """A store of three kinds of files: `tune` finds three classes and stores a dictionary for
    each (forced: the random test model cannot make one pay), the compaction codec picks per
    block, the LM blocks coded before are recode candidates, blocks coded with the classes name
    their class's dictionary and are not, the files read back,
    fsck is clean; damaged classes are reported by fsck and a mount falls back to the current
    dictionary; a single-dictionary tune drops the classes."""
    import blake3
    from llmfs.codec import Registry, container
    from llmfs.codec.registry import LM

    from llmfs import namespace as ns
    from llmfs.compactor import Compactor
    from llmfs.models import Models, store_spec
    from llmfs.namespace import ROOT_INO
    from llmfs.store import Store
    from llmfs.tune import tune

    path, fp, files = _kinds_store(env)
    said = tune(path, force=True)
    assert "classes of text" in said and "dictionaries are now current" in said, said
    lm_blocks = sorted(_lm_dictionaries(path))  # lm_store's, coded before
    s = Store(path)
    with s.read() as t:
        blob, held = t.dictionary_classes(), t.dictionaries()
    models = Models(s)
    codec = models.compaction_codec()
    assert codec.classes is not None and codec.classes.blob == blob
    ids = {d.id for d in codec.classes.dictionaries if d is not None}
    assert len(ids) >= 3 and ids <= set(held)
    compactor = Compactor(s, Registry(model_resolver=models.resolve), models.compaction_codec, store_spec(s))
    assert sorted(compactor.recode_candidates()) == lm_blocks  # none names a class's dictionary
    reg = Registry(model_resolver=models.resolve)
    with s.write() as t:  # every block as compaction writes it (the random model loses to zstd)
        for h, blob in list(t.blocks()):
            data = reg.decode(blob)
            payload = codec.encode_payload(data)
            t.replace_container(h, container.pack(LM, len(data), container.checksum(data), payload, fp))
    s.close()
    named = _lm_dictionaries(path)
    for data in files.values():  # each file's block continues its own kind's dictionary
        want = codec.classes.pick(codec.tokenizer.encode(data))
        assert want is not None and named[blake3.blake3(data).digest()] == want.id
    assert set(named.values()) == ids
    assert read_all(path) == TEXTS
    s = Store(path)
    models = Models(s)
    compactor = Compactor(s, Registry(model_resolver=models.resolve), models.compaction_codec, store_spec(s))
    assert [h for h in compactor.recode_candidates() if named[h] is not None] == []
    fs = ns.Filesystem(s, Registry(model_resolver=models.resolve))
    assert {n: fs.read_ino(fs.lookup(ROOT_INO, n), 1 << 20, 0) for n in files} == files
    s.close()
    assert _problems(path) == []
    s = Store(path)
    with s.write() as t:
        t.set_dictionary_classes(blob[:-3])
    s.close()
    assert _problems(path) == ["dictionaries"]
    s = Store(path)
    codec = Models(s).compaction_codec()  # unusable classes: logged, the current dictionary instead
    assert codec.classes is None and codec.dictionary is not None
    s.close()
    assert "built in" in tune(path, default=True)
    s = Store(path)
    with s.read() as t:
        assert t.dictionary_classes() is None
    s.close()
    assert _problems(path) == []
