"""Range coding with integer frequency rows: round trips, determinism, pinned words."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmfs.codec.lm import coder


def _rows(rng, m, v, skew=True):
    rows = rng.integers(1, 5, size=(m, v)).astype(np.int32)
    if skew:
        rows[np.arange(m), rng.integers(0, v, size=m)] += 100_000
    return rows


def _decode(words, rows):
    dec = coder.StreamDecoder(words)
    return [dec.decode(r) for r in rows]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(2, 600))
def test_round_trip(seed, m, v):
    rng = np.random.default_rng(seed)
    rows = _rows(rng, m, v)
    symbols = rng.integers(0, v, size=m)
    words = coder.encode_segment(symbols, rows)
    assert words.dtype == np.uint32
    assert _decode(words, rows) == list(symbols)


def test_extreme_frequencies():
    """Frequencies of 1 next to 2^30: the rare symbols are still codable."""
    v = 49_152
    rows = np.ones((4, v), dtype=np.int32)
    rows[:, 7] = 2**30
    symbols = [7, 0, v - 1, 7]
    assert _decode(coder.encode_segment(symbols, rows), rows) == symbols


def test_chunking_does_not_change_words(monkeypatch):
    rng = np.random.default_rng(3)
    rows, symbols = _rows(rng, 700, 1000), rng.integers(0, 1000, size=700)
    whole = coder.encode_segment(symbols, rows)
    monkeypatch.setattr(coder, "ENCODE_CHUNK_ROWS", 7)
    assert np.array_equal(coder.encode_segment(symbols, rows), whole)


def test_cost_is_close_to_ideal():
    rng = np.random.default_rng(5)
    rows = _rows(rng, 2000, 300)
    symbols = [int(rng.choice(300, p=r / r.sum())) for r in rows]
    ideal = -sum(np.log2(r[s] / r.sum()) for r, s in zip(rows, symbols))
    bits = 32 * len(coder.encode_segment(symbols, rows))
    assert ideal <= bits <= ideal * 1.01 + 64


def test_pinned_words():
    """The words for a fixed input never change: stored containers depend on them."""
    v = 16
    rows = np.array([[i * j % 7 + 1 for j in range(v)] for i in range(1, 11)], dtype=np.int32)
    symbols = [3, 0, 15, 7, 7, 1, 2, 9, 11, 4]
    words = coder.encode_segment(symbols, rows)
    assert words.tolist() == PINNED
    assert _decode(words, rows) == symbols


def test_mismatched_lengths():
    with pytest.raises(ValueError):
        coder.encode_segment([1, 2], np.ones((3, 4), dtype=np.int32))


PINNED = [441457301, 2575941485]  # constriction 0.5.0; must hold for every later version


def _sealed(symbols, rows) -> tuple[np.ndarray, bytes]:
    enc = coder.StreamEncoder()
    enc.encode(symbols, rows)
    return enc.words(), enc.sealed_bytes()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(2, 600), st.booleans())
def test_sealed_bytes_round_trip(seed, m, v, skew):
    """Payload version 5's streams: the roundest final point and no trailing zero bytes decode the
    same symbols as constriction's own words, and are never longer."""
    rng = np.random.default_rng(seed)
    rows = _rows(rng, m, v, skew)
    symbols = rng.integers(0, v, size=m)
    words, sealed = _sealed(symbols, rows)
    assert len(sealed) <= 4 * len(words) and not sealed.endswith(b"\0")
    assert _decode(coder.words_from_bytes(sealed), rows) == list(symbols)


def test_sealed_bytes_save_part_of_the_last_word():
    """Over many streams the cut saves more than a byte per stream on average (the final interval
    spans >= 2^32 of the coder's 2^64 state, so its roundest point has >= 32 trailing zero bits
    and usually more); an empty stream stays empty."""
    rng = np.random.default_rng(5)
    saved = []
    for _ in range(200):
        m = int(rng.integers(1, 80))
        rows = _rows(rng, m, 50)
        symbols = rng.integers(0, 50, size=m)
        words, sealed = _sealed(symbols, rows)
        assert _decode(coder.words_from_bytes(sealed), rows) == list(symbols)
        saved.append(4 * len(words) - len(sealed))
    assert sum(saved) / len(saved) > 1.0
    assert coder.StreamEncoder().sealed_bytes() == b""
    assert coder.words_from_bytes(b"\x01\x02\x03\x04\x05").tolist() == [0x01020304, 0x05000000]
