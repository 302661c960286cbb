"""Arithmetic coding of token ids with the engine's integer frequency rows.

The engine gives, per position, an int32 row of frequencies over the vocabulary (every entry >= 1).
`coding_probabilities` is the ONE function that turns such rows into what the coder consumes; the
encoder and the decoder both call it, so they cannot drift apart (the constriction tutorial shows how a
one-sided difference derails decoding after a few hundred symbols).

Coder: constriction's range coder (a queue: symbols come out in the order they went in) with a
`Categorical(perfect=False)` model family fed float64 probabilities. Integers below 2^53 are exact in
float64 and constriction's quantization is deterministic integer/IEEE arithmetic, so the same rows give
the same words everywhere. perfect=True would spend seconds per token at a 49k vocabulary.

Encoding passes a whole chunk of rows in one call (the 2-D probabilities form); decoding goes one
symbol at a time. Either is small next to the engine's time per token, and a segment's stream costs
about one 32-bit word of flush overhead over the ideal code length (docs/benchmarks.md).

Threading: a StreamDecoder belongs to one stream and one thread.
"""

from __future__ import annotations

import constriction
import numpy as np

# constriction is a compiled module whose submodules are attributes, not importable packages.
Categorical = constriction.stream.model.Categorical
RangeEncoder = constriction.stream.queue.RangeEncoder
RangeDecoder = constriction.stream.queue.RangeDecoder

# Rows per constriction call when encoding: bounds the float64 copy (256 × 49,152 × 8 B = 100 MB).
ENCODE_CHUNK_ROWS = 256

# A model *family*: the probabilities come with each call. perfect=False also implies lazy
# construction, which is exact here and fastest for one symbol per distribution.
_FAMILY = Categorical(perfect=False)


def coding_probabilities(
    freq_rows, out: np.ndarray | None = None, patches: list[tuple[int, list[int], list[int]]] | None = None
) -> np.ndarray:
    """int frequency rows (m, V) -> the float64 (m, V) array the coder is given (written into the
    first m rows of `out` if given: reusing one buffer spares the page faults of a fresh 100 MB
    array per chunk). Shared by encoder and decoder; exact because every integer below 2^53 is a
    float64. `patches`: (row, symbols, integer masses) that replace those entries (the mixer's,
    mixer.py: masses are integers >= 1 whose sum stays below 2^45, so every row sum stays exact)."""
    rows = np.asarray(freq_rows)
    if rows.ndim == 1:
        rows = rows[None, :]
    if out is None:
        dst = np.array(rows, dtype=np.float64, order="C")
    else:
        dst = out[: len(rows)]
        np.copyto(dst, rows, casting="safe")
    for r, symbols, masses in patches or ():
        dst[r, symbols] = masses
    return dst


def interleaved_order(lengths: list[int]) -> list[tuple[int, int]]:
    """(sequence, position) pairs in the order one stream codes several sequences: position 0 of
    every sequence (in order), then position 1 of every sequence still that long, and so on — the
    order in which a decoder stepping the sequences side by side meets them."""
    return [(j, t) for t in range(max(lengths, default=0)) for j, n in enumerate(lengths) if n > t]


_WORD = 1 << 32  # constriction's default range coder: 32-bit words, a 64-bit state
_STATE = 1 << 64


def words_from_bytes(buf: bytes) -> np.ndarray:
    """The uint32 words of a stream stored by StreamEncoder.sealed_bytes (zero bytes padded)."""
    buf = bytes(buf) + b"\0" * (-len(buf) % 4)
    return np.frombuffer(buf, dtype=">u4").astype(np.uint32)


class StreamEncoder:
    """One coded stream, fed symbols and their frequency rows a chunk at a time, in coding order
    (so an encoder never needs all of a stream's rows at once)."""

    def __init__(self):
        self._encoder = RangeEncoder()
        self._buf: np.ndarray | None = None

    def encode(
        self,
        symbols,
        freq_rows,
        patches: list[tuple[int, list[int], list[int]]] | None = None,
        unpatched: StreamEncoder | None = None,
    ) -> None:
        """`patches`: (row index into freq_rows, symbols, masses), as coding_probabilities.
        `unpatched`: a second stream that codes the same symbols with the rows as they are (the
        bare model beside the mixed one): it shares this stream's float64 copy of each chunk —
        coded before the patches are written into it — so the second coding costs only
        constriction's own work, not a second 100 MB copy."""
        symbols = np.asarray(symbols, dtype=np.int32)
        if len(symbols) != len(freq_rows):
            raise ValueError(f"{len(symbols)} symbols but {len(freq_rows)} frequency rows")
        for lo in range(0, len(symbols), ENCODE_CHUNK_ROWS):
            rows = freq_rows[lo : lo + ENCODE_CHUNK_ROWS]
            if self._buf is None or self._buf.shape[1] != rows.shape[1]:
                self._buf = np.empty((ENCODE_CHUNK_ROWS, rows.shape[1]), dtype=np.float64)
            mine = [(r - lo, s, m) for r, s, m in patches or () if lo <= r < lo + len(rows)]
            chunk = symbols[lo : lo + ENCODE_CHUNK_ROWS]
            if unpatched is not None:
                unpatched._encoder.encode(chunk, _FAMILY, coding_probabilities(rows, self._buf))
                for r, s, m in mine:  # the same result as coding_probabilities(rows, buf, mine)
                    self._buf[r, s] = m
                self._encoder.encode(chunk, _FAMILY, self._buf[: len(rows)])
            else:
                self._encoder.encode(chunk, _FAMILY, coding_probabilities(rows, self._buf, mine))

    def words(self) -> np.ndarray:
        """The compressed uint32 words of everything encoded so far."""
        return self._encoder.get_compressed()

    def sealed_bytes(self) -> bytes:
        """The stream as payload version 5 stores it: its words big-endian, the last one chosen
        with as many trailing zero bits as the final interval allows, and the trailing zero bytes
        cut (words_from_bytes pads them back; constriction's decoder reads missing words as zeros).

        Why this is exact: constriction seals a stream by writing the smallest word-aligned point
        of its final interval [lower, lower + range) (range >= 2^32, so one word suffices), and any
        point of that interval decodes the same symbols. The point with the most trailing zero bits
        in it is about range / 2^32 times "rounder": ~1.7 of the last word's 4 bytes on average.
        When constriction's own point would carry into earlier words (lower within 2^32 of 2^64)
        its words are kept as they are."""
        words = self._encoder.get_compressed()
        if len(words) == 0:
            return b""
        pos, (lower, span) = self._encoder.pos()
        if lower + _WORD - 1 < _STATE:  # no carry: words[:pos] are the same for every point
            hi = min(lower + span, _STATE) - 1
            k = 63
            while (hi >> k) << k < lower:
                k -= 1
            words = np.append(words[:pos], np.uint32(hi >> k << k >> 32))  # k >= 32: one word
        return np.asarray(words, dtype=">u4").tobytes().rstrip(b"\0")


def encode_interleaved(symbols: list, freq_rows: list) -> np.ndarray:
    """One stream for several sequences coded position-major: position 0 of every sequence (in
    order), then position 1 of every sequence still that long, and so on — the order in which a
    decoder stepping the sequences side by side meets them. freq_rows[j] is sequence j's (len, V)
    rows; only ENCODE_CHUNK_ROWS of them are copied at a time."""
    lengths = [len(s) for s in symbols]
    if lengths != [len(r) for r in freq_rows]:
        raise ValueError(f"sequences of {lengths} symbols but {[len(r) for r in freq_rows]} rows")
    order = interleaved_order(lengths)
    encoder = StreamEncoder()
    for lo in range(0, len(order), ENCODE_CHUNK_ROWS):
        chunk = order[lo : lo + ENCODE_CHUNK_ROWS]
        encoder.encode([symbols[j][t] for j, t in chunk], np.stack([freq_rows[j][t] for j, t in chunk]))
    return encoder.words()


def encode_segment(symbols, freq_rows) -> np.ndarray:
    """Code `symbols[i]` with distribution `freq_rows[i]`; returns the compressed uint32 words."""
    encoder = StreamEncoder()
    encoder.encode(symbols, np.asarray(freq_rows))
    return encoder.words()


class StreamDecoder:
    """Decodes one stream's words one symbol at a time, as the engine produces each next row (for
    an interleaved stream, the caller walks the sequences in encode_interleaved's order)."""

    def __init__(self, words: np.ndarray):
        self._decoder = RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))

    def decode(self, freq_row, symbols: list[int] | None = None, masses: list[int] | None = None) -> int:
        """The next symbol under `freq_row`, its `symbols` entries replaced by `masses` if given."""
        patches = [(0, symbols, masses)] if symbols else None
        return int(self._decoder.decode(_FAMILY, coding_probabilities(freq_row, None, patches))[0])


__all__ = [
    "coding_probabilities",
    "interleaved_order",
    "encode_interleaved",
    "encode_segment",
    "StreamEncoder",
    "StreamDecoder",
    "words_from_bytes",
    "ENCODE_CHUNK_ROWS",
]
