"""Exact online side models mixed into the LM's frequency rows (LM payload versions 3-5).

Two mixers: `GroupMixer` codes payload versions 3 and 4 and never changes again; `GroupMixerV5`
(version 5) is the same design with the additions its docstring lists. What follows describes both.

The LM sees one segment (<= 1,024 tokens) and starts cold at every segment; repeats that span
segments (logs, package lists, licences, generated code) and the block's own vocabulary are what it
misses. A `GroupMixer` learns them while a segment group is coded and reshapes each frequency row
before it reaches the arithmetic coder:

  * a match model: the latest earlier occurrence of the current segment's last MATCH_MIN tokens
    (in any segment of the group) predicts the token that followed it; the match extends while its
    predictions come true, and its length picks an adaptive hit probability;
  * token n-gram counts of orders ORDERS (contexts: the segment's own last k tokens), shared by the
    group's segments;
  * a logistic mixer (paq style, in the stretch domain) per candidate token: its inputs are the
    LM's probability of the candidate, the match model's hit probability (when the candidate is the
    match's prediction), each order's count estimate and a bias. One weight vector per group: a
    group has only a few thousand tokens to learn from, and weight sets chosen by match length or
    n-gram evidence learned too slowly (measured on 8 KiB files: -1.26 % vs -1.56 % against the
    float floor with one set). It starts near the identity on the LM's probability, so a group
    with nothing to learn codes about as the bare model does.

Shape of the mix (cheap on a 49,152-wide row): at most MAX_CANDIDATES tokens are candidates —
the match's prediction, then the most frequent successor of the longest contexts. The mixer gives
candidate i a probability p_i conditional on the token not being an earlier candidate; every other
token keeps the LM's frequency. In integers: R = row total minus the candidates' LM frequencies;
going from the last candidate to the first, mass_i = (R + masses after i) * p_i / (1 - p_i),
capped so that the row's total stays below MASS_CAP. The
coder (coder.coding_probabilities) writes those masses over the candidates' entries; constriction
normalises the row (every entry stays >= 1, every value an integer below 2^53, so the row's sum and
its quantisation are exact). Only the candidates' entries and the row's total are read — one
integer sum per row, no rescaling pass.

Exactness: everything here is Python integer arithmetic (exact, same on every machine) on the
engine's integer rows and the tokens coded so far; the squash table is built with integer fixed-point
arithmetic from one mpmath constant, stretch is its integer inverse. Encoder and decoder call `predict` and
`update` in the stream's coding order (coder.interleaved_order: position-major over the group's
segments), fed the same tokens, so they hold the same state at every step; a prediction only uses
tokens already coded (a match whose continuation is not coded yet predicts nothing).

State lives per segment group (one coded stream), so every group — and every block — decodes on its
own. Threading: a GroupMixer belongs to one stream and one thread.
"""

from __future__ import annotations

import functools

import mpmath

# Any change to a constant or formula below changes coded words: it needs a new payload version
# (codec.py keeps the old mixer for old payloads).
P_BITS = 16  # probabilities are integers in (0, 2^16)
P_ONE = 1 << P_BITS
D_RES = 256  # stretch domain: 1/256 nat
D_MAX = 12 * D_RES  # |stretch| <= 12 nats: p in [6e-6, 1 - 6e-6]
W_ONE = 1 << 16  # mixer weights: 16 fractional bits
LR_SHIFT = 14  # weight step = stretch * error >> LR_SHIFT (error in 2^-16 units)
ORDERS = (1, 2, 3, 4, 6)  # n-gram context lengths (the segment's own last k tokens)
MATCH_MIN = 4  # tokens of context a match needs
MATCH_MAX = 48  # match lengths are counted up to this
MAX_CANDIDATES = 3
# A row's total after mixing stays below about this (2^44 + the row's own total), far below 2^53:
# float64 sums of the row stay exact. (The coder's 24-bit quantisation gives no candidate more
# than 1 - V / 2^24 anyway.)
MASS_CAP = 1 << 44
HIT_SHIFT = 4  # match hit probabilities adapt by 1/16 of the error
_HIT_INIT = 3 * P_ONE // 4
_BUCKETS = (0, 6, 12, 24)  # match length >= these: bucket 1..4 (0: no match prediction)
# initial weights: [lm, match, order 1.., bias]
_W_INIT = (W_ONE, W_ONE // 2) + tuple(W_ONE // 8 for _ in ORDERS) + (0,)


@functools.lru_cache(maxsize=1)
def _squash_table() -> tuple[int, ...]:
    """squash(d) = round(2^16 / (1 + e^(-d / 256))) for d in [-D_MAX, D_MAX], clamped to
    [1, 2^16 - 1], in exact integer arithmetic: e^(-d/256) as 100-bit fixed-point powers of
    e^(-1/256) (one mpmath value, rounded down; the powers' error stays below 2^-85, far below what
    could move a rounding to 16 bits by more than one ulp — and it is the same on every machine);
    squash(-d) = 2^16 - squash(d)."""
    one = 1 << 100
    with mpmath.workprec(160):
        step = int(mpmath.floor(mpmath.exp(mpmath.mpf(-1) / D_RES) * one))
    pos, e = [], one
    for _ in range(D_MAX + 1):
        den = one + e
        pos.append(min(P_ONE - 1, (2 * P_ONE * one + den) // (2 * den)))
        e = e * step >> 100
    return tuple(P_ONE - v for v in reversed(pos[1:])) + tuple(pos)


@functools.lru_cache(maxsize=1)
def _stretch_table() -> tuple[int, ...]:
    """stretch(p) for p in [0, 2^16): the smallest d with squash(d) >= p (squash's inverse),
    D_MAX where there is none."""
    sq = _squash_table()
    out, d = [], 0
    for p in range(P_ONE):
        while d < len(sq) and sq[d] < p:
            d += 1
        out.append(min(D_MAX, d - D_MAX))
    return tuple(out)


def _bucket(length: int) -> int:
    b = 1
    for lo in _BUCKETS[1:]:
        if length >= lo:
            b += 1
    return b


def _masses(probs: list[int], rest: int) -> list[int]:
    """The integer masses that give the candidates their mixed probabilities, last first: each
    candidate's probability p (in P_ONE units) of being the next token given that the ones
    before it were not is turned into a mass against the mass `acc` of everything after it,
    mass / (acc + mass) = p, with `rest` (the row's mass left to the other tokens) at the
    bottom. Integer arithmetic: the same masses on every CPU; capped by MASS_CAP."""
    masses = []
    acc = max(rest, 1)
    for p in reversed(probs):
        mass = max(1, min(acc * p // (P_ONE - p), MASS_CAP - acc))
        masses.append(mass)
        acc += mass
    masses.reverse()
    return masses


def _count(table: dict, key: tuple, y: int) -> None:
    """One more y after context `key`: the entry is [most frequent successor, its count, total,
    {successor: count}] (ties go to the latest)."""
    e = table.get(key)
    if e is None:
        table[key] = [y, 1, 1, {y: 1}]
        return
    c = e[3].get(y, 0) + 1
    e[3][y] = c
    e[2] += 1
    if c >= e[1]:
        e[0], e[1] = y, c


class GroupMixer:
    """Side models and mixer of one segment group. Per position: `predict(j, row, total)` gives the
    candidates' tokens and integer masses for segment j's next token; `update(j, token)` then
    learns from the token actually coded. Calls alternate, in coding order."""

    def __init__(self, n_segments: int, primer: tuple[int, ...] | list[int] = ()):
        """`primer` (payload version 4: the store dictionary's tokens) is learned first, as one more
        segment (index n_segments) that is never predicted: it seeds the n-gram counts and gives
        the match model a history to find, while the mixer's weights start as without it."""
        self._sq = _squash_table()
        self._st = _stretch_table()
        extra = 1 if primer else 0
        self.hist: list[list[int]] = [[] for _ in range(n_segments + extra)]
        self._ngram: list[dict] = [{} for _ in ORDERS]  # context tuple -> [best, best_n, n, counts]
        self._match_at: dict[tuple, tuple[int, int]] = {}  # context -> (segment, index after it)
        self._match: list[list[int] | None] = [None] * (n_segments + extra)  # [segment, index, length]
        self._hit = [_HIT_INIT] * (len(_BUCKETS) + 1)
        self._w = list(_W_INIT)
        self._pending: tuple | None = None
        for t in primer:
            self.update(n_segments, int(t))
        if primer:
            self._match[n_segments] = None

    # -- prediction ---------------------------------------------------------------------------------
    def _match_prediction(self, j: int) -> tuple[int, int]:
        """(the token segment j's match model predicts, its match-length bucket), or (-1, 0) when
        it has no match or the match has reached the end of its source's history."""
        m = self._match[j]
        if m is not None:
            src = self.hist[m[0]]
            if m[1] < len(src):
                return src[m[1]], _bucket(m[2])
        return -1, 0

    def predict(self, j: int, row, total: int) -> tuple[list[int], list[int]]:
        """Candidates for segment j's next token and the masses that replace their entries of
        `row` (an int frequency row whose entries sum to `total`); ([], []) leaves the row as is."""
        h = self.hist[j]
        ctxs = []  # per order: the context's entry, or None
        xm, bucket = self._match_prediction(j)
        cands: list[int] = [xm] if xm >= 0 else []
        n = len(h)
        for k, table in zip(ORDERS, self._ngram):
            ctxs.append(table.get(tuple(h[n - k :])) if n >= k else None)
        for e in reversed(ctxs):
            if e is not None and e[0] not in cands and len(cands) < MAX_CANDIDATES:
                cands.append(e[0])
        if not cands:
            self._pending = None
            return [], []
        sq, st = self._sq, self._st
        freqs = [int(row[x]) for x in cands]
        rest = total
        probs, feats = [], []
        for x, f in zip(cands, freqs):
            p_lm = min(P_ONE - 1, max(1, (f << P_BITS) // max(rest, 1)))
            rest -= f
            s = [st[p_lm], st[self._hit[bucket]] if x == xm else 0]
            for e in ctxs:
                if e is None:
                    s.append(0)
                    continue
                c = e[3].get(x, 0)
                s.append(st[((2 * c + 1) << P_BITS) // (2 * e[2] + 2)])
            s.append(D_RES)
            w = self._w
            d = sum(a * b for a, b in zip(w, s)) >> 16
            p = sq[min(D_MAX, max(-D_MAX, d)) + D_MAX]
            probs.append(p)
            feats.append((s, w))
        masses = _masses(probs, rest)
        self._pending = (cands, probs, feats, xm, bucket)
        return cands, masses

    # -- learning -----------------------------------------------------------------------------------
    def update(self, j: int, y: int) -> None:
        """Learn from segment j's coded token y (after predict(j, ...))."""
        if self._pending is not None:
            cands, probs, feats, xm, bucket = self._pending
            for x, p, (s, w) in zip(cands, probs, feats):
                hit = x == y
                err = (P_ONE if hit else 0) - p
                for i, si in enumerate(s):
                    if si:
                        w[i] += (si * err) >> LR_SHIFT
                if hit:
                    break
            if xm >= 0:
                self._hit[bucket] += ((P_ONE if xm == y else 0) - self._hit[bucket]) >> HIT_SHIFT
                self._hit[bucket] = min(P_ONE - 1, max(1, self._hit[bucket]))
            self._pending = None
        h = self.hist[j]
        n = len(h)
        for k, table in zip(ORDERS, self._ngram):
            if n < k:
                break
            _count(table, tuple(h[n - k :]), y)
        self._learn_match(j, y)

    def _learn_match(self, j: int, y: int) -> None:
        """Append y to segment j's history and move its match (the second half of update, both versions)."""
        h = self.hist[j]
        h.append(y)
        n = len(h)
        m = self._match[j]
        if m is not None:
            src = self.hist[m[0]]
            if m[1] < len(src) and src[m[1]] == y:
                m[1] += 1
                m[2] = min(MATCH_MAX, m[2] + 1)
            else:
                m = None
        if n >= MATCH_MIN:
            key = tuple(h[n - MATCH_MIN :])
            if m is None:
                at = self._match_at.get(key)
                if at is not None:
                    s, q = at
                    src = self.hist[s]
                    length = MATCH_MIN
                    while (
                        length < MATCH_MAX
                        and q - length - 1 >= 0
                        and n - length - 1 >= 0
                        and src[q - length - 1] == h[n - length - 1]
                    ):
                        length += 1
                    m = [s, q, length]
            self._match_at[key] = (j, n)
        self._match[j] = m


# -- version 5 --------------------------------------------------------------------------------------
V5_LR_START = 11  # weight step shift of the first updates ...
V5_LR_END = 15  # ... growing by one every time the update count's bit length grows by 2
V5_APM_RATE = 6  # APM entries move by 1/64 of the error
_V5_APM_NODES = 33  # interpolation nodes over [-D_MAX, D_MAX]


def line_breaks(tokenizer, vocab_size: int) -> frozenset[int]:
    """The token ids whose bytes contain a newline (GroupMixerV5's line contexts). A function of
    the tokenizer alone, which the codec fingerprint covers."""
    out = []
    for i in range(vocab_size):
        try:
            if b"\n" in tokenizer.decode([i]):
                out.append(i)
        except (ValueError, IndexError, KeyError):  # an escape token, an id the tokenizer lacks
            continue
    return frozenset(out)


class GroupMixerV5(GroupMixer):
    """The version 5 mixer: version 3's match model, n-grams and logistic mix, plus (each measured
    on the five session-6 sample files, ideal code length, kept because it paid):

      * line contexts: two more count tables keyed by the current line's first token and the
        last one or two tokens (fields of logs, package lists, tables: "Maintainer:" predicts its
        value better than the tokens just before it do). Lines end at tokens whose bytes hold a
        newline (`breaks`, from the tokenizer: line_breaks);
      * a determinism input per context: +1 when the context has only ever been followed by the
        candidate, -1 when never by it (PAQ's "deterministic context" bit);
      * a learning-rate schedule: large steps while a group's mixer knows nothing (shift
        V5_LR_START), smaller as it has learned (up to V5_LR_END) — small groups learn fast,
        large ones settle;
      * an APM (adaptive probability map, PAQ's SSE) on each candidate's mixed probability, per
        (candidate rank, match length bucket) context: 33 nodes over the stretch domain,
        interpolated; the candidate's probability is the mean of the mixer's and the APM's.

    Same exactness rules as GroupMixer: integers only, state per group, fed in coding order."""

    def __init__(
        self,
        n_segments: int,
        primer: tuple[int, ...] | list[int] = (),
        breaks: frozenset[int] = frozenset(),
    ):
        self._sq = _squash_table()
        self._st = _stretch_table()
        self._breaks = breaks
        n = n_segments + (1 if primer else 0)
        self.hist: list[list[int]] = [[] for _ in range(n)]
        self._line = [0] * n  # where each segment's current line starts in its history
        k = len(ORDERS) + 2  # contexts: the orders, then the two line contexts
        self._ngram: list[dict] = [{} for _ in range(k)]
        self._match_at: dict[tuple, tuple[int, int]] = {}
        self._match: list[list[int] | None] = [None] * n
        self._hit = [_HIT_INIT] * (len(_BUCKETS) + 1)
        # [lm, match, per context: count estimate, per context: determinism, bias]
        self._w = [W_ONE, W_ONE // 2] + [W_ONE // 8] * k + [0] * k + [0]
        self._apm: dict[tuple[int, int], list[int]] = {}
        self._updates = 0
        self._pending: tuple | None = None
        for t in primer:  # as GroupMixer: one more segment, learned first, never predicted
            self.update(n_segments, int(t))
        if primer:
            self._match[n_segments] = None

    def _keys(self, j: int) -> list:
        """The count tables' contexts for segment j's next token (None: not available yet)."""
        h = self.hist[j]
        n = len(h)
        out: list = [tuple(h[n - k :]) if n >= k else None for k in ORDERS]
        ls = self._line[j]
        out.append((h[ls], h[-1]) if n > ls + 1 else None)
        out.append((h[ls], h[-2], h[-1]) if n > ls + 2 else None)
        return out

    def _apm_row(self, ctx: tuple[int, int]) -> list[int]:
        r = self._apm.get(ctx)
        if r is None:  # starts as the identity: node i at stretch (i - 16) / 16 * D_MAX
            sq = self._sq
            r = self._apm[ctx] = [sq[(i - 16) * D_MAX // 16 + D_MAX] for i in range(_V5_APM_NODES)]
        return r

    def predict(self, j: int, row, total: int) -> tuple[list[int], list[int]]:
        xm, bucket = self._match_prediction(j)
        cands: list[int] = [xm] if xm >= 0 else []
        ctxs = [table.get(key) if key is not None else None for key, table in zip(self._keys(j), self._ngram)]
        for e in reversed(ctxs):  # the line contexts first, then the longest order
            if e is not None and e[0] not in cands and len(cands) < MAX_CANDIDATES:
                cands.append(e[0])
        if not cands:
            self._pending = None
            return [], []
        sq, st, w = self._sq, self._st, self._w
        span = 2 * D_MAX
        rest = total
        probs, feats = [], []
        for r, x in enumerate(cands):
            f = int(row[x])
            p_lm = min(P_ONE - 1, max(1, (f << P_BITS) // max(rest, 1)))
            rest -= f
            s = [st[p_lm], st[self._hit[bucket]] if x == xm else 0]
            det = []
            for e in ctxs:
                if e is None:
                    s.append(0)
                    det.append(0)
                    continue
                c = e[3].get(x, 0)
                s.append(st[((2 * c + 1) << P_BITS) // (2 * e[2] + 2)])
                det.append(D_RES if c and len(e[3]) == 1 else (-D_RES if not c else 0))
            s += det
            s.append(D_RES)
            d = min(D_MAX, max(-D_MAX, sum(a * b for a, b in zip(w, s)) >> 16))
            p_mix = sq[d + D_MAX]
            a = self._apm_row((r, bucket if x == xm else 0))
            at = (d + D_MAX) * (_V5_APM_NODES - 1)
            lo, frac = at // span, at % span
            hi = min(_V5_APM_NODES - 1, lo + 1)
            p_apm = (a[lo] * (span - frac) + a[hi] * frac) // span
            p = min(P_ONE - 1, max(1, (p_mix + p_apm) >> 1))
            probs.append(p)
            feats.append((s, p_mix, a, hi if 2 * frac >= span else lo, x == xm))
        masses = _masses(probs, rest)
        self._pending = (cands, feats, xm, bucket)
        return cands, masses

    def update(self, j: int, y: int) -> None:
        if self._pending is not None:
            cands, feats, xm, bucket = self._pending
            shift = min(V5_LR_END, V5_LR_START + self._updates.bit_length() // 2)
            self._updates += 1
            w = self._w
            for x, (s, p_mix, a, node, is_match) in zip(cands, feats):
                target = P_ONE if x == y else 0
                err = target - p_mix
                for i, si in enumerate(s):
                    if si:
                        w[i] += (si * err) >> shift
                a[node] = min(P_ONE - 1, max(1, a[node] + ((target - a[node]) >> V5_APM_RATE)))
                if is_match:
                    self._hit[bucket] += (target - self._hit[bucket]) >> HIT_SHIFT
                    self._hit[bucket] = min(P_ONE - 1, max(1, self._hit[bucket]))
                if x == y:
                    break
            self._pending = None
        keys = self._keys(j)
        for key, table in zip(keys, self._ngram):
            if key is not None:
                _count(table, key, y)
        self._learn_match(j, y)
        if y in self._breaks:
            self._line[j] = len(self.hist[j])


__all__ = ["GroupMixer", "GroupMixerV5", "line_breaks", "ORDERS", "MATCH_MIN", "MAX_CANDIDATES"]
