"""The LM codec: payload round trips, independence from batch size, typed errors on bad input.

Most tests use a tiny deterministic model with the byte tokenizer so they run in seconds; one test
(marked slow, run in CI) goes through the real default model."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from llmfs.codec import LM, ZSTD, ChecksumMismatch, ContainerError, ModelMismatch, Registry, Truncated
from llmfs.codec.lm import coder
from llmfs.codec.lm.codec import GROUP_SEGMENTS, PAYLOAD_VERSION, LMCodec
from llmfs.codec.lm.tokenizer import ByteTokenizer

from tests.fake_engine import BigramEngine
from tests.lm_helpers import tiny_engine

ADVERSARIAL = [
    b"",
    b"a",
    b"\x00",
    b"\x00" * 300,
    b"\xff\xfe\xed\xa0\x80",
    b"a\r\nb\r\n",
    b"  lead",
    bytes(range(256)),
    b"z" * 600,
    "naïve café 日本 🙂".encode(),
]
TEXT = (
    b"It is a truth universally acknowledged, that a single man in possession of a good "
    b"fortune, must be in want of a wife. However little known the feelings or views of such a "
    b"man may be on his first entering a neighbourhood, this truth is so well fixed in the minds "
    b"of the surrounding families, that he is considered the rightful property of some one or "
    b'other of their daughters. "My dear Mr. Bennet," said his lady to him one day, "have '
    b'you heard that Netherfield Park is let at last?" Mr. Bennet replied that he had not. '
    b'"But it is," returned she; "for Mrs. Long has just been here, and she told me all '
    b'about it." Mr. Bennet made no answer. "Do you not want to know who has taken it?" '
    b'cried his wife impatiently. "You want to tell me, and I have no objection to hearing '
    b'it."\n'
)


def make_codec(engine=None, **kw) -> LMCodec:
    kw.setdefault("segment_tokens", 64)  # several segments even for short inputs
    return LMCodec((engine or tiny_engine(), ByteTokenizer()), **kw)


def trained(seed: int = 0) -> BigramEngine:
    return BigramEngine(seed=seed, train=TEXT)


@pytest.fixture(scope="module", params=["bigram", "tiny"])
def codec(request):
    engine = trained() if request.param == "bigram" else tiny_engine()
    return make_codec(engine, batch=4)


def round_trip(c: LMCodec, data: bytes) -> bytes:
    payload = c.encode_payload(data)
    (out,) = c.decode_many([(payload, len(data))])
    assert out == data
    return payload


@pytest.mark.parametrize("data", ADVERSARIAL)
def test_adversarial_round_trip(codec, data):
    round_trip(codec, data)


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_round_trip(data):
    round_trip(make_codec(BigramEngine(), batch=3), data)


def test_decode_many_mixed_lengths(codec):
    datas = [TEXT[:300], b"", b"x", TEXT[:100], bytes(range(200))]
    payloads = [codec.encode_payload(d) for d in datas]
    assert codec.decode_many([(p, len(d)) for p, d in zip(payloads, datas)]) == datas


def test_payload_independent_of_batch():
    """The same bytes give the same payload whatever the batch; each decodes with any batch."""
    engine, data = tiny_engine(), TEXT[:300]  # 5 segments of <= 63 tokens
    payloads = {b: make_codec(engine, batch=b).encode_payload(data) for b in (1, 2, 16)}
    assert len(set(payloads.values())) == 1
    payload = payloads[1]
    for b in (1, 3):
        assert make_codec(engine, batch=b).decode_many([(payload, len(data))]) == [data]


def test_segments_are_cut_at_the_configured_length():
    c = make_codec(BigramEngine(), segment_tokens=33)
    payload = c.encode_payload(b"q" * 100)  # 100 tokens -> 4 segments of <= 32, one group
    # version 5: N << 2 | flags (shape given: 2) as a varint, S, G, no table for the one group
    assert payload[:5] == bytes([5, (100 << 2 | 2) & 0x7F | 0x80, (100 << 2 | 2) >> 7, 32, GROUP_SEGMENTS])
    c.version = 3
    payload = c.encode_payload(b"q" * 100)
    assert payload[:5] == bytes([3, 100, 32, GROUP_SEGMENTS, len(payload[5:]) // 4])
    c.version = 2
    payload = c.encode_payload(b"q" * 100)
    assert payload[:5] == bytes([2, 100, 32, GROUP_SEGMENTS, len(payload[5:]) // 4])


def version1(c: LMCodec, data: bytes) -> bytes:
    """A version 1 payload of `data`: one stream per segment, no group field."""
    c.group, c.version = 1, 2
    v2 = c.encode_payload(data)
    c.group, c.version = GROUP_SEGMENTS, PAYLOAD_VERSION
    assert v2[0] == 2
    head = bytearray([1])
    pos = 1
    for _ in range(2):  # N, S: copied
        while v2[pos] & 0x80:
            head.append(v2[pos])
            pos += 1
        head.append(v2[pos])
        pos += 1
    assert v2[pos] == 1  # G = 1: dropped
    return bytes(head) + v2[pos + 1 :]


def test_version_1_payloads_still_decode():
    c, data = make_codec(trained()), TEXT[:300]
    v1 = version1(c, data)
    assert c.decode_many([(v1, len(data)), (c.encode_payload(data), len(data))]) == [data, data]


def test_groups_share_a_stream_and_save_bytes():
    """Payloads with segments grouped GROUP_SEGMENTS per stream are smaller than one stream per
    segment, and decode with any batch, also one smaller than a group (the group still gets its
    rows)."""
    c, data = make_codec(trained()), TEXT * 2  # 18 segments of <= 63 tokens
    grouped, single = c.encode_payload(data), version1(c, data)
    assert len(grouped) < len(single) - 2 * 12
    for b in (1, 3, 5, 64):
        assert make_codec(trained(), batch=b).decode_many([(grouped, len(data))]) == [data]


def test_streaming_encoder_codes_what_whole_tables_would(monkeypatch):
    """The encoder runs the LM head a chunk of positions at a time (engine.hidden, then
    engine.head); its words equal coding each group from whole engine.freqs tables, whatever the
    chunk size — on the tiny real engine, whose hidden states and head are the real code."""
    engine = tiny_engine()
    c = LMCodec((engine, ByteTokenizer()), segment_tokens=40)
    data = TEXT[:700]  # 18 segments: groups of 16 and 2
    segs = c.segments(data)
    expect = []
    for a in range(0, len(segs), c.group):
        group = segs[a : a + c.group]
        batch = torch.full((len(group), 1 + max(map(len, group))), engine.bos_id)
        for r, seg in enumerate(group):
            batch[r, 1 : 1 + len(seg)] = torch.tensor(seg)
        f = engine.freqs(batch).numpy()
        expect.append(coder.encode_interleaved(group, [f[r, : len(s)] for r, s in enumerate(group)]))
    assert [w.tolist() for w in c._encode_groups(segs)] == [w.tolist() for w in expect]
    payload = c.encode_payload(data)
    monkeypatch.setattr(coder, "ENCODE_CHUNK_ROWS", 7)
    assert c.encode_payload(data) == payload
    assert c.decode_many([(payload, len(data))]) == [data]


@pytest.mark.parametrize("version", [3, 5])
def test_garbled_group_size_is_a_typed_error(version):
    c = make_codec(trained())
    c.version = version
    payload = bytearray(c.encode_payload(TEXT))
    at = 3 if payload[1] < 0x80 else 4  # after version, N (version 5: N << 2 | flags) and S (63)
    assert payload[at] == GROUP_SEGMENTS
    for g in (0, 65, 127):
        payload[at] = g
        with pytest.raises(ContainerError, match="group size"):
            c.decode_many([(bytes(payload), len(TEXT))])


def test_text_compresses():
    assert len(make_codec(trained()).encode_payload(TEXT)) < len(TEXT) / 2


def test_binary_is_skipped_quickly(codec):
    assert codec.encode(os.urandom(5000)) is None
    assert codec.encode(TEXT) is not None


def test_truncated_payload_raises_typed_error(codec):
    codec.version = 3  # version 3's table gives every stream's length
    try:
        payload = codec.encode_payload(TEXT)
    finally:
        codec.version = PAYLOAD_VERSION
    for cut in (0, 1, 2, 3, 5, len(payload) // 2, len(payload) - 1):
        with pytest.raises(Truncated):
            codec.decode_many([(payload[:cut], len(TEXT))])


def test_cut_or_extended_version5_payload_never_gives_wrong_bytes(codec):
    """Version 5's last stream is the rest of the payload: a cut inside the head is Truncated, a
    cut or extended stream decodes to other tokens (refused by the length check or the registry's
    checksum) or, where the change stays inside the coder's final interval, to the same bytes."""
    from llmfs.codec import container

    reg = Registry()
    reg.add_model(codec)
    payload = codec.encode_payload(TEXT)  # (the registry might store the tiny model's as raw)
    blob = container.pack(LM, len(TEXT), container.checksum(TEXT), payload, codec.fingerprint)
    start = reg.header(blob).payload_offset
    assert blob[start] == 5 and reg.decode(blob) == TEXT
    for cut in (0, 1, 2, 3):
        with pytest.raises(Truncated):
            codec.decode_many([(blob[start : start + cut], len(TEXT))])
    for bad in [blob[:n] for n in range(len(blob) - 12, len(blob))] + [blob + b"\0", blob + b"\x01\x02"]:
        try:
            out = reg.decode(bad)
        except ContainerError:
            continue
        assert out == TEXT


def test_garbled_payload_never_gives_wrong_bytes():
    """Flip bytes of the payload one at a time: decoding fails with a ContainerError or — when the
    damage is in coded words — the registry's checksum catches it. Never wrong bytes."""
    codec = make_codec(trained())
    reg = Registry()
    reg.add_model(codec)
    blob = reg.encode(TEXT, codecs=(LM,), fingerprint=codec.fingerprint)
    assert reg.header(blob).codec_id == LM
    start = reg.header(blob).payload_offset
    for i in range(start, len(blob), max(1, (len(blob) - start) // 40)):
        bad = bytearray(blob)
        bad[i] ^= 0x5A
        try:
            out = reg.decode(bytes(bad))
        except ContainerError:
            continue
        assert out == TEXT  # a flip the coder happened to absorb; never anything else


def test_coded_words_the_model_cannot_produce_are_a_typed_error():
    """Words that no coder state yields (constriction asserts on them) are ChecksumMismatch, like
    every other corrupt payload — not an AssertionError escaping to the filesystem or fsck."""
    c, data = make_codec(trained()), TEXT[:400]
    for version, word in ((3, 4), (5, 1)):
        c.version = version
        payload = c.encode_payload(data)
        head = len(payload) - sum(word * len(g.words) for g in c._parse(payload, 0))
        if version == 5:  # one group: its stream is the rest of the payload
            head = len(payload) - len(c._parse(payload, 0)[0].words.astype(">u4").tobytes().rstrip(b"\0"))
        with pytest.raises(ChecksumMismatch, match="invalid for this model"):
            c.decode_many([(payload[:head] + b"\xff" * (len(payload) - head), len(data))])


def test_trailing_bytes_are_an_error(codec):
    codec.version = 3  # version 5: see test_cut_or_extended_version5_payload_never_gives_wrong_bytes
    try:
        payload = codec.encode_payload(TEXT)
    finally:
        codec.version = PAYLOAD_VERSION
    with pytest.raises(ChecksumMismatch):
        codec.decode_many([(payload + b"\0\0\0\0", len(TEXT))])


def test_wrong_length_is_an_error(codec):
    payload = codec.encode_payload(TEXT)
    with pytest.raises(ChecksumMismatch):
        codec.decode_many([(payload, len(TEXT) + 1)])


def test_registry_round_trip_and_model_mismatch():
    c0, c1 = make_codec(trained(0)), make_codec(trained(1))
    assert c0.fingerprint != c1.fingerprint and len(c0.fingerprint) == 8
    reg = Registry()
    reg.add_model(c0)
    blob = reg.encode(TEXT, codecs=(ZSTD, LM), fingerprint=c0.fingerprint)
    assert reg.header(blob).codec_id == LM
    assert reg.decode(blob) == TEXT
    other = Registry()
    other.add_model(c1)
    with pytest.raises(ModelMismatch, match="not loaded"):
        other.decode(blob)


def test_fingerprint_depends_on_segment_format_not_batch():
    e = tiny_engine()
    assert make_codec(e, batch=1).fingerprint == make_codec(e, batch=9, threads=1).fingerprint


@pytest.mark.slow
def test_real_default_model_round_trip():
    """A few hundred bytes of English through SmolLM2-135M and its BPE tokenizer."""
    from llmfs.codec.lm import open_codec

    c = open_codec(batch=4)
    text = (
        b"The Free Software Foundation may publish revised and/or new versions of the GNU "
        b"General Public License from time to time. Such new versions will be similar in "
        b"spirit to the present version, but may differ in detail to address new problems "
        b"or concerns.\n\nEach version is given a distinguishing version number.\r\n\xff"
    )
    payload = c.encode_payload(text)
    assert len(payload) < len(text) * 0.35  # an LM, not a byte model: well under 3 bits/byte
    assert c.decode_many([(payload, len(text))]) == [text]
