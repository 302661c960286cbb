"""The mixed LM payload (version 3, codec/lm/mixer.py): exactness and format.

The mixer's state must be the same in the encoder (rows from one parallel pass, mixed chunk by
chunk) and the decoder (rows from engine.step, groups side by side in a batch): these tests code
with different batch sizes, chunk sizes and thread counts and require identical words, and pin one
payload's bytes so the format cannot change by accident. All on the tiny models (seconds)."""

from __future__ import annotations

import hashlib

import pytest
import torch
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


def test_mixed_is_the_default_payload_and_v2_still_written_on_request(engine):
    c = make_codec(engine)
    v3 = c.encode_payload(TEXT)
    c.version = 2
    v2 = c.encode_payload(TEXT)
    assert (v3[0], v2[0]) == (3, 2) and v3[1:4] == v2[1:4] and v3 != v2
    v1 = version1(c, TEXT)
    assert c.decode_many([(v3, len(TEXT)), (v2, len(TEXT)), (v1, len(TEXT))]) == [TEXT] * 3


def test_mixed_payload_independent_of_batch_chunks_and_threads(engine, monkeypatch):
    """Same payload whatever the batch, the encoder's chunk size or the thread count; it decodes
    with any batch, alone or beside other payloads (groups interleaved in one engine batch)."""
    data = TEXT * 2 + LOG  # 30 segments: groups of 16 and 14
    payloads = set()
    for batch in (1, 2, 16):
        payloads.add(make_codec(engine, batch=batch).encode_payload(data))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        payloads.add(make_codec(engine).encode_payload(data))
    finally:
        torch.set_num_threads(old)
    monkeypatch.setattr(coder, "ENCODE_CHUNK_ROWS", 7)  # mixer state crosses chunk borders
    payloads.add(make_codec(engine).encode_payload(data))
    monkeypatch.undo()
    assert len(payloads) == 1
    (payload,) = payloads
    assert payload[0] == 3
    other = make_codec(engine).encode_payload(LOG[:200])
    for batch in (1, 3, 16, 64):
        c = make_codec(engine, batch=batch)
        assert c.decode_many([(payload, len(data))]) == [data]
        assert c.decode_many([(other, 200), (payload, len(data)), (other, 200)]) == [
            LOG[:200],
            data,
            LOG[:200],
        ]


def test_groups_decode_on_their_own():
    """A group's mixer sees only its own tokens: cutting the data at a group border gives the
    second group the same words as in the whole payload."""
    c = make_codec(trained())
    per = c.segment_tokens - 1
    data = (TEXT * 3)[: per * c.group * 2]  # exactly two full groups (byte tokens)
    whole = c._encode_groups(c.segments(data), mixed=True)
    second = c._encode_groups(c.segments(data[per * c.group :]), mixed=True)
    assert len(whole) == 2 and whole[1].tolist() == second[0].tolist()


def test_mixing_learns_repeats_the_model_cannot_see():
    """The tiny random model knows nothing; within a group the match model and n-grams learn the
    repeated lines, so the mixed payload is far smaller than the bare model's — while on random
    bytes mixing costs (almost) nothing."""
    c = make_codec(tiny_engine())
    mixed = c.encode_payload(LOG)
    c.version = 2
    bare = c.encode_payload(LOG)
    assert len(mixed) < 0.5 * len(bare)
    noise = bytes((i * 7919 + (i * i) % 251) % 256 for i in range(3000))
    c.version = 3
    mixed_noise = c.encode_payload(noise)
    c.version = 2
    assert len(mixed_noise) <= 1.01 * len(c.encode_payload(noise))


def test_mixed_payload_bytes_are_pinned():
    """The exact bytes of one mixed payload (bigram model: integer rows independent of the
    engine's arithmetic), so that no change to the mixer, the coder or the layout slips through.
    A deliberate format change needs a new payload version (and keeps this one decoding)."""
    c = LMCodec((BigramEngine(seed=3, train=TEXT), ByteTokenizer()), segment_tokens=64)
    payload = c.encode_payload(TEXT + LOG)
    assert payload[0] == 3
    assert (
        hashlib.sha256(payload).hexdigest()
        == "a48d1f27ef432b8411ec640f711773ee906de219ceb10a30da9ddc708b3e72ac"
    )
    assert len(payload) == PIN_LEN
    assert c.decode_many([(payload, len(TEXT + LOG))]) == [TEXT + LOG]


PIN_LEN = 531


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_payload_same_on_cuda():
    engine = tiny_engine()
    data = TEXT + LOG
    cpu = make_codec(engine).encode_payload(data)
    gpu = LMCodec((engine.to("cuda"), ByteTokenizer()), segment_tokens=64)
    assert gpu.encode_payload(data) == cpu
    assert gpu.decode_many([(cpu, len(data))]) == [data]


def test_bench_codec_reports_bare_and_full_codec(tmp_path):
    """`llmfs bench codec` with the tiny model: columns for the bare model and the full codec, and
    both round trips checked."""
    import subprocess
    import sys

    f = tmp_path / "log.txt"
    f.write_bytes(LOG)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmfs.cli",
            "bench",
            "codec",
            "-m",
            "tiny",
            "--no-floor",
            "--threads",
            "1",
            "--segment",
            "64",
            str(f),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    head, row = [ln for ln in res.stdout.splitlines() if "raw" in ln or str(f) in ln][-2:]
    names = [head[i : i + 12].strip() for i in range(0, len(head.rstrip()) - 4, 12)]  # 10 + 2 wide
    values = dict(zip(names, row.split()))
    assert {"bare", "lm", "bare bpb", "lm bpb", "enc/bare", "dec/bare"} <= set(values)
    assert int(values["lm"]) < 0.5 * int(values["bare"])  # the repeats, learned by the mixer
