"""Arithmetic coding of token ids with the engine's integer frequency rows.

The engine gives, per position, an int32 row of frequencies over the vocabulary (every entry >= 1).
`coding_probabilities` is the ONE function that turns such rows into what the coder consumes; the
encoder and the decoder both call it, so they cannot drift apart (the constriction tutorial shows how a
one-sided difference derails decoding after a few hundred symbols).

Coder: constriction's range coder (a queue: symbols come out in the order they went in) with a
`Categorical(perfect=False)` model family fed float64 probabilities. Integers below 2^53 are exact in
float64 and constriction's quantization is deterministic integer/IEEE arithmetic, so the same rows give
the same words everywhere. perfect=True would spend seconds per token at a 49k vocabulary.

Measured here (49,152-symbol rows): encoding 0.04 ms/token when a whole chunk of rows goes in one call
(the 2-D probabilities form), decoding 0.04 ms/token one symbol at a time; a segment's stream costs
about one 32-bit word of flush overhead over the ideal code length.

Threading: a StreamDecoder belongs to one stream and one thread.
"""
from __future__ import annotations

import numpy as np
import constriction

# constriction is a compiled module whose submodules are attributes, not importable packages.
Categorical = constriction.stream.model.Categorical
RangeEncoder = constriction.stream.queue.RangeEncoder
RangeDecoder = constriction.stream.queue.RangeDecoder

# Rows per constriction call when encoding: bounds the float64 copy (256 × 49,152 × 8 B = 100 MB).
ENCODE_CHUNK_ROWS = 256

# A model *family*: the probabilities come with each call. perfect=False also implies lazy
# construction, which is exact here and fastest for one symbol per distribution.
_FAMILY = Categorical(perfect=False)


def coding_probabilities(freq_rows) -> np.ndarray:
    """int frequency rows (m, V) -> the float64 (m, V) array the coder is given. Shared by encoder and
    decoder; exact because every integer below 2^53 is a float64."""
    rows = np.asarray(freq_rows)
    if rows.ndim == 1:
        rows = rows[None, :]
    return np.ascontiguousarray(rows, dtype=np.float64)


def encode_interleaved(symbols: list, freq_rows: list) -> np.ndarray:
    """One stream for several sequences coded position-major: position 0 of every sequence (in
    order), then position 1 of every sequence still that long, and so on — the order in which a
    decoder stepping the sequences side by side meets them. freq_rows[j] is sequence j's (len, V)
    rows; only ENCODE_CHUNK_ROWS of them are copied at a time."""
    lengths = [len(s) for s in symbols]
    if lengths != [len(r) for r in freq_rows]:
        raise ValueError(f"sequences of {lengths} symbols but {[len(r) for r in freq_rows]} rows")
    order = [(j, t) for t in range(max(lengths, default=0)) for j, n in enumerate(lengths) if n > t]
    encoder = RangeEncoder()
    for lo in range(0, len(order), ENCODE_CHUNK_ROWS):
        chunk = order[lo:lo + ENCODE_CHUNK_ROWS]
        rows = np.stack([freq_rows[j][t] for j, t in chunk])
        encoder.encode(np.array([symbols[j][t] for j, t in chunk], dtype=np.int32), _FAMILY,
                       coding_probabilities(rows))
    return encoder.get_compressed()


def encode_segment(symbols, freq_rows) -> np.ndarray:
    """Code `symbols[i]` with distribution `freq_rows[i]`; returns the compressed uint32 words."""
    symbols = np.asarray(symbols, dtype=np.int32)
    if len(symbols) != len(freq_rows):
        raise ValueError(f"{len(symbols)} symbols but {len(freq_rows)} frequency rows")
    encoder = RangeEncoder()
    for lo in range(0, len(symbols), ENCODE_CHUNK_ROWS):
        hi = lo + ENCODE_CHUNK_ROWS
        encoder.encode(symbols[lo:hi], _FAMILY, coding_probabilities(freq_rows[lo:hi]))
    return encoder.get_compressed()


class StreamDecoder:
    """Decodes one stream's words one symbol at a time, as the engine produces each next row (for
    an interleaved stream, the caller walks the sequences in encode_interleaved's order)."""

    def __init__(self, words: np.ndarray):
        self._decoder = RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))

    def decode(self, freq_row) -> int:
        return int(self._decoder.decode(_FAMILY, coding_probabilities(freq_row))[0])


__all__ = ["coding_probabilities", "encode_interleaved", "encode_segment", "StreamDecoder",
           "ENCODE_CHUNK_ROWS"]
