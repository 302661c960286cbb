"""The mixed LM payloads (versions 3 and 5, codec/lm/mixer.py): exactness and format.

The mixer's state must be the same in the encoder (rows from one parallel pass, mixed chunk by
chunk) and the decoder (rows from engine.step, groups side by side in a batch): these tests code
with different batch sizes, chunk sizes and thread counts and require identical words, and pin one
payload's bytes so the format cannot change by accident. All on the tiny models (seconds)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from llmfs.codec.container import ContainerError, Truncated, varint
from llmfs.codec.lm import coder, mixer
from llmfs.codec.lm.codec import LMCodec
from llmfs.codec.lm.tokenizer import ByteTokenizer

from tests.fake_engine import BigramEngine
from tests.lm_helpers import tiny_engine
from tests.test_lm_codec import TEXT, make_codec, trained, version1

# repetitive data, as a log or a package list: the match model and the n-grams must find it
LOG = b"".join(
    b"Package: lib%d\nStatus: install ok installed\nPriority: optional\n"
    b"Architecture: amd64\n\n" % (i * 37 % 101)
    for i in range(12)
)


def test_squash_and_stretch_tables_are_pinned():
    """The tables are part of the format: built with integer arithmetic, they must never drift."""
    sq, st = mixer._squash_table(), mixer._stretch_table()
    assert len(sq) == 2 * mixer.D_MAX + 1 and len(st) == mixer.P_ONE
    assert sq[mixer.D_MAX] == mixer.P_ONE // 2
    assert all(a <= b for a, b in zip(sq, sq[1:]))
    assert all(sq[i] + sq[-1 - i] == mixer.P_ONE for i in range(len(sq)))
    assert sq[mixer.D_MAX + 256] == 47911  # 65536 / (1 + e^-1) = 47910.7
    digest = hashlib.sha256(repr((sq, st)).encode()).hexdigest()
    assert digest[:16] == "5b69c72bab2442c3"


def test_masses_stay_exact_under_extreme_confidence():
    """Long repeats drive the mixer to its most confident: masses stay >= 1 and the patched row's
    total below 2^53 (float64 sums exact)."""
    m = mixer.GroupMixer(1)
    row = [1000] * 300  # a model that knows nothing
    big = 0
    for i in range(3000):
        y = (i % 9) * 11 if i % 97 else i % 256
        cands, masses = m.predict(0, row, sum(row))
        assert all(v >= 1 for v in masses) and len(set(cands)) == len(cands)
        total = sum(row) + sum(v - row[x] for x, v in zip(cands, masses))
        assert total < 2**53
        big = max(big, total)
        m.update(0, y)
    assert big > 2**30  # it did get confident


@pytest.fixture(scope="module", params=["bigram", "tiny"])
def engine(request):
    return trained() if request.param == "bigram" else tiny_engine()


def test_version5_is_the_default_payload_and_older_ones_still_written_on_request(engine):
    c = make_codec(engine)
    v5 = c.encode_payload(TEXT)
    c.version = 3
    v3 = c.encode_payload(TEXT)
    c.version = 2
    v2 = c.encode_payload(TEXT)
    assert (v5[0], v3[0], v2[0]) == (5, 3, 2) and v3[1:4] == v2[1:4] and v3 != v2
    v1 = version1(c, TEXT)
    items = [(v5, len(TEXT)), (v3, len(TEXT)), (v2, len(TEXT)), (v1, len(TEXT))]
    assert c.decode_many(items) == [TEXT] * 4


def _codec(engine, version, batch=None):
    c = make_codec(engine) if batch is None else make_codec(engine, batch=batch)
    c.version = version
    if version == 3:
        c.group = 16  # two groups of 30 segments below, as version 3 payloads were written
    return c


@pytest.mark.parametrize("version", [3, 5])
def test_mixed_payload_independent_of_batch_chunks_and_threads(engine, version, monkeypatch):
    """Same payload whatever the batch, the encoder's chunk size or the thread count; it decodes
    with any batch, alone or beside other payloads (groups interleaved in one engine batch)."""
    data = TEXT * 2 + LOG + TEXT[:900]  # 49+ segments: several groups in either version
    payloads = set()
    for batch in (1, 2, 16):
        payloads.add(_codec(engine, version, batch).encode_payload(data))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        payloads.add(_codec(engine, version).encode_payload(data))
    finally:
        torch.set_num_threads(old)
    monkeypatch.setattr(coder, "ENCODE_CHUNK_ROWS", 7)  # mixer state crosses chunk borders
    payloads.add(_codec(engine, version).encode_payload(data))
    monkeypatch.undo()
    assert len(payloads) == 1
    (payload,) = payloads
    c = _codec(engine, version)
    assert payload[0] == version
    assert len(c._parse(payload, 0)) == -(-len(c.segments(data)) // c.group) >= 2
    other = _codec(engine, version).encode_payload(LOG[:200])
    for batch in (1, 3, 16, 64):
        c = make_codec(engine, batch=batch)
        assert c.decode_many([(payload, len(data))]) == [data]
        assert c.decode_many([(other, 200), (payload, len(data)), (other, 200)]) == [
            LOG[:200],
            data,
            LOG[:200],
        ]


@pytest.mark.parametrize("version", [3, 5])
def test_groups_decode_on_their_own(version):
    """A group's mixer sees only its own tokens: cutting the data at a group border gives the
    second group the same words as in the whole payload."""
    c = make_codec(trained())
    c.group = 8
    per = c.segment_tokens - 1
    data = (TEXT * 3)[: per * c.group * 2]  # exactly two full groups (byte tokens)
    whole = c._encode_streams(c.segments(data), version)
    second = c._encode_streams(c.segments(data[per * c.group :]), version)
    assert len(whole) == 2 and whole[1].sealed_bytes() == second[0].sealed_bytes()


def test_mixing_learns_repeats_the_model_cannot_see():
    """The tiny random model knows nothing; within a group the match model and n-grams learn the
    repeated lines, so the mixed payload is far smaller than the bare model's — while on random
    bytes mixing costs (almost) nothing."""
    c = make_codec(tiny_engine())
    noise = bytes((i * 7919 + (i * i) % 251) % 256 for i in range(3000))
    for version in (3, 5):
        c.version = version
        mixed, mixed_noise = c.encode_payload(LOG), c.encode_payload(noise)
        c.version = 2
        assert len(mixed) < 0.5 * len(c.encode_payload(LOG))
        assert len(mixed_noise) <= 1.01 * len(c.encode_payload(noise))


def test_mixed_payload_bytes_are_pinned():
    """The exact bytes of one mixed payload of each version (bigram model: integer rows
    independent of the engine's arithmetic), so that no change to a mixer, the coder or the layout
    slips through. A deliberate format change needs a new payload version (and keeps these
    decoding)."""
    c = LMCodec((BigramEngine(seed=3, train=TEXT), ByteTokenizer()), segment_tokens=64)
    c.version, c.group = 3, 16  # as version 3 was written
    payload = c.encode_payload(TEXT + LOG)
    assert payload[0] == 3
    assert (
        hashlib.sha256(payload).hexdigest()
        == "a48d1f27ef432b8411ec640f711773ee906de219ceb10a30da9ddc708b3e72ac"
    )
    assert len(payload) == PIN_LEN
    assert c.decode_many([(payload, len(TEXT + LOG))]) == [TEXT + LOG]

    c = LMCodec((BigramEngine(seed=3, train=TEXT), ByteTokenizer()), segment_tokens=64)
    v5 = c.encode_payload(TEXT + LOG)
    assert v5[0] == 5
    assert hashlib.sha256(v5).hexdigest() == PIN_V5
    assert len(v5) == PIN_V5_LEN
    assert c.decode_many([(v5, len(TEXT + LOG)), (payload, len(TEXT + LOG))]) == [TEXT + LOG] * 2


def _own_chain(eng, n: int, seed: int = 1) -> bytes:
    """Bytes drawn from the bigram model's own distribution: the model is the truth, so the side
    models can only cost bits on average — where version 6 codes groups bare."""
    import numpy as np

    t = eng.table.numpy().astype(np.float64)[:, :256]
    rng, prev, out = np.random.default_rng(seed), eng.bos_id, []
    for _ in range(n):
        prev = int(rng.choice(256, p=t[prev] / t[prev].sum()))
        out.append(prev)
    return bytes(out)


def _v6_codec(batch: int = 64, group: int = 4) -> LMCodec:
    c = LMCodec((BigramEngine(seed=3, train=TEXT), ByteTokenizer()), segment_tokens=64, batch=batch)
    c.group = group
    return c


def test_version6_codes_a_group_bare_where_that_is_smaller(monkeypatch):
    """Each group coded both ways from the same rows; the smaller kept per group, the choice in the
    payload's bits. The payload is the same whatever the batch or the encoder's chunk size, decodes
    at batch 1/4/64 alone or beside others, is never larger than version 5, and its bare groups'
    streams are those of the bare model (the same rows, no patches)."""
    c = _v6_codec()
    data = _own_chain(c.engine, 1500)
    payloads = {_v6_codec(batch).encode_payload(data) for batch in (1, 4, 64)}
    monkeypatch.setattr(coder, "ENCODE_CHUNK_ROWS", 7)  # the shared float64 copy crosses chunks
    payloads.add(_v6_codec().encode_payload(data))
    monkeypatch.undo()
    assert len(payloads) == 1
    (v6,) = payloads
    c.version = 5
    v5 = c.encode_payload(data)
    assert v6[0] == 6 and v5[0] == 5 and len(v6) < len(v5)
    groups = c._parse(v6, 0)
    kinds = [g.mixed for g in groups]
    assert len(groups) == 6 and True in kinds and False in kinds  # a mix of both choices
    segs = c.segments(data)
    bare = [e.sealed_bytes() for e in c._encode_streams(segs, None)]
    mixed = [e.sealed_bytes() for e in c._encode_streams(segs, 5)]
    for k, g in enumerate(groups):
        want = mixed[k] if g.mixed else bare[k]
        assert (g.words == coder.words_from_bytes(want)).all()
        assert len(want) == min(len(mixed[k]), len(bare[k]))
    other = _v6_codec().encode_payload(TEXT)  # a version 5 payload beside it
    assert other[0] == 5
    for batch in (1, 4, 64):
        d = _v6_codec(batch)
        assert d.decode_many([(v6, len(data))]) == [data]
        assert d.decode_many([(other, len(TEXT)), (v6, len(data)), (v5, len(data))]) == [TEXT, data, data]
    assert hashlib.sha256(v6).hexdigest() == PIN_V6


def test_version6_one_group_spends_no_byte_on_the_choice():
    """One group: the version byte says it is bare; version 6 is version 5's layout byte for byte
    but for the version and the stream."""
    c = _v6_codec(group=32)
    data = _own_chain(c.engine, 1500)
    v6 = c.encode_payload(data)
    (g,) = c._parse(v6, 0)
    assert v6[0] == 6 and not g.mixed
    (bare,) = c._encode_streams(c.segments(data), None)
    c.version = 5
    v5 = c.encode_payload(data)
    head = len(v5) - len(c._encode_streams(c.segments(data), 5)[0].sealed_bytes())
    assert v6[1:head] == v5[1:head] and v6[head:] == bare.sealed_bytes()
    assert c.decode_many([(v6, len(data))]) == [data]


def test_version6_damaged_bits_never_give_wrong_bytes():
    """A cut inside the bare-group bits is Truncated; a flipped bit decodes a group with the wrong
    rows, which the length check or the registry's checksum refuses (never the same bytes)."""
    c = _v6_codec()
    data = _own_chain(c.engine, 1500)
    v6 = c.encode_payload(data)
    # version, head (token count and flags), shape (S, G): then the bits
    pos = 1 + len(varint_of(c, data)) + len(varint(c.segment_tokens - 1)) + len(varint(c.group))
    with pytest.raises(Truncated):
        c._parse(v6[:pos], 0)
    flipped = v6[:pos] + bytes([v6[pos] ^ 1]) + v6[pos + 1 :]
    try:
        out = c.decode_many([(flipped, len(data))])
    except ContainerError:
        return
    assert out != [data]


def varint_of(c, data: bytes) -> bytes:
    return varint(sum(map(len, c.segments(data))) << 2 | 2)


PIN_V6 = "d0d43dab7dcd6e5351b7ab83eef038c37508fe3bd0e242dd33eb5395fab39048"
PIN_LEN = 531
PIN_V5 = "7a4cd69bc18ef526d7f5a05a0604a38505f9ac7253572f7b1b153f0109090ee3"
PIN_V5_LEN = 464


def test_version5_mixer_learns_line_fields():
    """GroupMixerV5's line contexts: the line breaks come from the tokenizer, and on a log whose
    field values repeat by field (not by the tokens just before them) they make version 5 smaller
    than it is without them."""
    c = make_codec(tiny_engine())
    assert mixer.line_breaks(c.tokenizer, c.tokenizer.vocab_size) == frozenset({10})
    log = b"".join(b"id=%d host=h%d user=u%d op=%s\n" % (i, i % 3, i % 5, b"rw"[i % 2 :]) for i in range(150))
    with_lines = c.encode_payload(log)
    c._breaks = frozenset()  # as if no token ended a line
    assert len(with_lines) < len(c.encode_payload(log))
    c._breaks = None
    assert c.decode_many([(with_lines, len(log))]) == [log]
