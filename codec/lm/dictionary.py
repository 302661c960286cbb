"""The store dictionary: a priming context that every segment of a block continues.

Each segment of an LM payload is coded independently, so without one it starts cold: its first
tokens are predicted from BOS alone, and that costs most where segments are many and short (small
files, the tail of every block). A dictionary is a few hundred tokens that the engine runs once
(engine.Engine.prefix: their KV state, the same integers the engine computes for them as a prefix
on every CPU and backend); every segment of a version 4 payload then starts at position
len(dictionary) + 1 with that state, and its group's mixer (mixer.GroupMixer) is primed with the
same tokens (match model and n-gram counts), so a store's recurring headers, keywords and line
shapes predict from the first token on.

Where dictionaries come from:
  * the store's own data (`choose`, run by `llmfs tune STORE`): the lines that recur in the most
    sampled files, most widespread first, then the beginning of a typical file, up to TUNED_TOKENS;
  * a built-in default (`default`, `llmfs tune --default`): a fixed mixed sample of prose, source
    code, configuration and log lines, tokenized by the model's own tokenizer and cut to what the
    model's window allows. It is not used unless chosen: context from another kind of text costs
    about as much as it saves (it primes the model for the wrong kind of file), so an untuned store
    writes version 3 payloads (docs/benchmarks.md, session 5).

Identity: a dictionary is its token ids (the tokenizer is already fixed by the model fingerprint
in every container). Its id is an 8-byte digest of its serialized form, which is what a version 4
payload records; the store keeps every dictionary a block names (store meta "dict:<id hex>"), so
its blocks decode whatever the built-in default becomes in later releases. The built-in default's
text must never change without a new name: tests pin its id for the default model's tokenizer.

A dictionary may also carry an *extension* (DICT_FORMAT 2): more tokens of the store's text that
only the mixer is primed with, before the dictionary's own tokens — the engine never sees them, so
they cost no attention and no KV memory, only the mixer's learning of them once per group
(~0.1 CPU-s for 8,192 tokens, against seconds of engine work per group) and its tables (~16 MB
for a group in flight instead of ~3). The match model then
finds a block's passages in the store's other files (licences that share paragraphs, the same
package in a log and a status list, a configuration's recurring stanzas) from the first token on;
a block whose text is not there loses almost nothing (docs/benchmarks.md, session 9). `choose`
takes the extension from the samples' starts (the last EXTENSION_TOKENS tokens of them, in
order).

Serialized form (`blob`): u8 DICT_FORMAT, varint count, count × varint token id; with an
extension (format 2), then varint count, count × varint token id of the extension. A dictionary
without one is serialized as format 1, byte for byte as before (so its id is unchanged).

The heavier alternative, adapting the weights to the store's data (LoRA-style), is weighed in
docs/design.md: it would change the engine's integer tables per store (a model file per store and
per tune), where a dictionary is data the unchanged engine reads.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass

from ..container import ChecksumMismatch, ContainerError, read_varint, varint

DICT_FORMAT = 1
DICT_FORMAT_EXTENDED = 2  # with a mixer-only extension
ID_SIZE = 8
# Dictionary tokens for the built-in default and for tune. Each costs every segment one attended
# key per layer and position (KV memory and decoding attention grow by len/segment length), and
# the priming value of more context falls off fast (docs/benchmarks.md, session 5).
DEFAULT_TOKENS = 192
TUNED_TOKENS = 256
MAX_TOKENS = 1024  # a reader refuses more
# The extension: what `choose` takes, and what a reader accepts. Its cost is the mixer's priming,
# once per group, linear in its length.
EXTENSION_TOKENS = 8192
MAX_EXTENSION = 16384
SAMPLE_BYTES = 4096  # what `choose` reads of each sampled file
_TAG = b"llmfs-lm-dictionary-1\0"

# The built-in default's text: part of the format (its tokens' digest is recorded in payloads).
# Never edit it; add a new default beside it instead.
DEFAULT_TEXT = (
    "The following is a collection of files from a computer: documents, source code, "
    "configuration, logs and lists.\n\n"
    "# Introduction\n\nThis document describes how the system is installed, configured and used. "
    "It is written in plain English, for users and administrators.\n\n"
    "def main(argv=None):\n"
    '    """Parse the command line and run the program."""\n'
    "    import argparse\n\n"
    "    parser = argparse.ArgumentParser(description=__doc__)\n"
    '    parser.add_argument("path", help="the file to read")\n'
    "    args = parser.parse_args(argv)\n"
    '    with open(args.path, encoding="utf-8") as f:\n'
    "        for line in f:\n"
    "            print(line.rstrip())\n"
    "    return 0\n\n"
    "[Unit]\nDescription=Example service\nAfter=network.target\n\n"
    "Package: libexample1\nStatus: install ok installed\nPriority: optional\n"
    "Section: libs\nArchitecture: amd64\nVersion: 1.2.3-1\n"
    "Description: example library\n\n"
    "Dec  1 12:00:00 host systemd[1]: Started Example service.\n"
    '{"name": "example", "version": "1.0.0", "license": "MIT"}\n'
)


@dataclass(frozen=True)
class Dictionary:
    tokens: tuple[int, ...]
    extension: tuple[int, ...] = ()  # mixer-only tokens, learned before `tokens`

    @property
    def blob(self) -> bytes:
        out = varint(len(self.tokens)) + b"".join(varint(t) for t in self.tokens)
        if not self.extension:
            return bytes([DICT_FORMAT]) + out
        ext = varint(len(self.extension)) + b"".join(varint(t) for t in self.extension)
        return bytes([DICT_FORMAT_EXTENDED]) + out + ext

    @property
    def primer(self) -> tuple[int, ...]:
        """What a group's mixer learns first: the extension, then the tokens."""
        return self.extension + self.tokens

    @property
    def id(self) -> bytes:
        return hashlib.blake2b(_TAG + self.blob, digest_size=ID_SIZE).digest()


def parse(blob: bytes) -> Dictionary:
    """A serialized dictionary; ChecksumMismatch if it is not one."""
    buf = bytes(blob)
    if not buf or buf[0] not in (DICT_FORMAT, DICT_FORMAT_EXTENDED):
        raise ChecksumMismatch("LM dictionary: unknown format")
    toks, pos = _read_tokens(buf, 1, 1, MAX_TOKENS)
    ext: tuple[int, ...] = ()
    if buf[0] == DICT_FORMAT_EXTENDED:
        ext, pos = _read_tokens(buf, pos, 1, MAX_EXTENSION)
    if pos != len(buf):
        raise ChecksumMismatch("LM dictionary: trailing bytes")
    return Dictionary(toks, ext)


def _read_tokens(buf: bytes, pos: int, least: int, most: int) -> tuple[tuple[int, ...], int]:
    n, pos = read_varint(buf, pos, "LM dictionary")
    if not least <= n <= most:
        raise ChecksumMismatch(f"LM dictionary: {n} tokens")
    toks = []
    for _ in range(n):
        t, pos = read_varint(buf, pos, "LM dictionary")
        toks.append(t)
    return tuple(toks), pos


def fit(tokens: list[int], max_seq_len: int, limit: int) -> int:
    """How many dictionary tokens a model with this window takes: at most `limit`, and at most a
    quarter of the window (segments keep the rest)."""
    return max(0, min(limit, max_seq_len // 4, len(tokens)))


def default(tokenizer, max_seq_len: int) -> Dictionary:
    """The built-in default for this tokenizer and window."""
    toks = tokenizer.encode(DEFAULT_TEXT.encode())
    return Dictionary(tuple(toks[: fit(toks, max_seq_len, DEFAULT_TOKENS)]))


def choose(
    samples: list[bytes],
    tokenizer,
    max_seq_len: int,
    limit: int = TUNED_TOKENS,
    extension: int = EXTENSION_TOKENS,
) -> Dictionary | None:
    """A dictionary from a store's data (`samples`: the start of some of its files): the lines
    found in the most samples (at least two), most widespread first, then the start of the
    sample that shares the most of those lines, until the token budget is spent; and, for the
    mixer alone, the last `extension` tokens of the samples one after another (0: none). None
    when the samples are empty."""
    samples = [s for s in samples if s]
    if not samples:
        return None
    df: Counter[bytes] = Counter()
    for s in samples:
        df.update({ln for ln in s.splitlines(keepends=True) if 4 <= len(ln.strip()) <= 200})
    common = [ln for ln, n in sorted(df.items(), key=lambda kv: (-kv[1], kv[0])) if n >= 2]
    budget = fit([0] * limit, max_seq_len, limit)
    chosen, used = [], 0
    for ln in common:
        n = len(tokenizer.encode(ln))
        if used + n > budget:
            break
        chosen.append(ln)
        used += n
    shared = set(common[:256])
    best = max(samples, key=lambda s: (sum(ln in shared for ln in s.splitlines(keepends=True)), -len(s)))
    toks = tokenizer.encode(b"".join(chosen) + b"\n" + best) if chosen else tokenizer.encode(best)
    toks = toks[:budget]
    if not toks:
        return None
    ext: list[int] = []
    for s in reversed(samples):  # the last samples' tokens, as far as the budget goes
        if len(ext) >= extension:
            break
        ext[:0] = tokenizer.encode(s)
    return Dictionary(tuple(toks), tuple(ext[max(0, len(ext) - extension) :]))


# -- several dictionaries per store: classes of samples, and the encoder's pick per block ----------
#
# One dictionary cannot fit a store of code, prose, lists and other languages: context from another
# kind of text shifts the model's guesses (a prose-heavy one made a Python module 6 % larger,
# docs/benchmarks.md session 6). So `llmfs tune` sorts its samples into classes of similar text
# (`classes`), chooses one dictionary per class and measures it on that class's held-out samples
# (a class whose dictionary does not pay keeps none), and stores the classes (`Classes`: each
# class's profile and its dictionary or none). The encoder then picks per block (`Classes.pick`):
# the class whose profile the block's start matches best, if any matches well enough, gives the
# dictionary. The payload names the chosen dictionary by its id exactly as with a single one, so
# the decoder follows without a rule of its own and old payloads are untouched; the pick is the
# encoder's business and may change between releases.
#
# The statistic is the set of token bigrams: cheap (no model pass; ~1 ms per block), independent
# of the text's script, and it separates the kinds that matter (on this machine's licences, Python
# modules, man pages, dpkg lists and Chinese text, 4 KiB samples of one kind share 0.1-0.4 of
# their bigrams, of two kinds under 0.05). A class's profile is its samples' most widespread
# bigrams; a block is scored against each profile by the share of its own bigrams the profile
# holds, each bigram weighted by how few profiles hold it (so that the punctuation and spacing
# every kind shares does not decide).
MAX_CLASSES = 8  # classes (dictionaries) a store keeps at once
CLASS_SIMILARITY = 0.05  # average-linkage clusters merge while their mean similarity is above this
# A class's profile: its samples' most widespread bigrams. The profiles are stored with the classes
# (~4 bytes per bigram, delta-coded): 1024 of them keep a class's entry near 4 KiB, which matters
# for a small store, and still separate the kinds measured (docs/benchmarks.md, session 7).
PROFILE_BIGRAMS = 1024
PICK_TOKENS = 512  # what the encoder compares of a block's start
MIN_SCORE = 0.05  # a block matching no profile better than this continues no dictionary
CLASSES_FORMAT = 1
_KEY_BITS = 20  # a profile bigram's key: first token << 20 | second token


def bigrams(tokens) -> frozenset[tuple[int, int]]:
    """The set of adjacent token pairs of `tokens`."""
    return frozenset(zip(tokens, tokens[1:]))


def similarity(a: frozenset, b: frozenset) -> float:
    """Cosine similarity of two bigram sets (0 when either is empty)."""
    return len(a & b) / math.sqrt(len(a) * len(b)) if a and b else 0.0


def classes(token_lists: list[list[int]], limit: int = MAX_CLASSES) -> list[list[int]]:
    """The samples (given as token lists) sorted into classes of similar text: average-linkage
    agglomerative clustering of their bigram sets, merging while the best pair of clusters is
    more similar than CLASS_SIMILARITY. The `limit` largest classes of at least two samples, as
    lists of sample indices, largest first (ties: lowest first index); the other samples belong
    to no class. Deterministic: same samples, same classes."""
    sets = [bigrams(t) for t in token_lists]
    n = len(sets)
    clusters = [[i] for i in range(n)]
    # (a, b), a < b -> the sum of pairwise similarities between clusters a and b
    link = {(a, b): similarity(sets[a], sets[b]) for a in range(n) for b in range(a + 1, n)}
    while link:
        best, pair = -1.0, (0, 0)
        for (a, b), total in link.items():
            avg = total / (len(clusters[a]) * len(clusters[b]))
            if avg > best:
                best, pair = avg, (a, b)
        if best < CLASS_SIMILARITY:
            break
        a, b = pair
        clusters[a] += clusters[b]
        clusters[b] = []
        for c in range(n):
            if c not in (a, b) and clusters[c]:
                ka, kb = (min(a, c), max(a, c)), (min(b, c), max(b, c))
                link[ka] += link[kb]
        link = {k: v for k, v in link.items() if b not in k}
    found = [sorted(c) for c in clusters if len(c) >= 2]
    found.sort(key=lambda c: (-len(c), c[0]))
    return found[:limit]


def profile(token_lists: list[list[int]]) -> frozenset[tuple[int, int]]:
    """A class's profile: the PROFILE_BIGRAMS bigrams found in the most of its samples."""
    df: Counter[tuple[int, int]] = Counter()
    for t in token_lists:
        df.update(bigrams(t))
    ranked = sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))
    return frozenset(g for g, _ in ranked[:PROFILE_BIGRAMS])


@dataclass(frozen=True)
class Classes:
    """A store's classes of text: per class its profile (bigram set) and the dictionary its blocks
    continue (None: the class's dictionary did not pay on its held-out samples)."""

    profiles: tuple[frozenset, ...]
    dictionaries: tuple[Dictionary | None, ...]

    def scores(self, tokens) -> list[float]:
        """How well the start of a block (`tokens`) matches each class: the share of its distinct
        bigrams the class's profile holds, each weighted by log((K + 1) / (1 + the number of the K
        profiles that hold it))."""
        mine = bigrams(tokens[:PICK_TOKENS])
        if not mine:
            return [0.0] * len(self.profiles)
        k = len(self.profiles)
        weight = {g: math.log((k + 1) / (1 + sum(g in p for p in self.profiles))) for g in mine}
        whole = len(mine) * math.log(k + 1)
        return [sum(weight[g] for g in mine & p) / whole for p in self.profiles]

    def pick(self, tokens) -> Dictionary | None:
        """The dictionary a block of these tokens continues: the best-matching class's (the first
        on ties), if its score reaches MIN_SCORE; else None."""
        scores = self.scores(tokens)
        if not scores:
            return None
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return self.dictionaries[best] if scores[best] >= MIN_SCORE else None

    @property
    def blob(self) -> bytes:
        """u8 CLASSES_FORMAT, varint K, K × (u8 has dictionary, [8-byte id], varint M, M × varint
        gap): the profile's bigrams (a, b) as keys a << 20 | b in increasing order (token ids are
        below 2^20), each coded as its difference from the previous key (the first from 0)."""
        out = [bytes([CLASSES_FORMAT]), varint(len(self.profiles))]
        for p, d in zip(self.profiles, self.dictionaries):
            out.append(b"\1" + d.id if d is not None else b"\0")
            out.append(varint(len(p)))
            last = 0
            for key in sorted(a << _KEY_BITS | b for a, b in p):
                out.append(varint(key - last))
                last = key
        return b"".join(out)


def parse_classes(blob: bytes, held: dict[bytes, Dictionary]) -> Classes:
    """Classes from their serialized form; `held`: id -> dictionary (the store's). ChecksumMismatch
    if the blob is not one or names a dictionary not held."""
    buf = bytes(blob)
    what = "LM dictionary classes"
    if not buf or buf[0] != CLASSES_FORMAT:
        raise ChecksumMismatch(f"{what}: unknown format")
    k, pos = read_varint(buf, 1, what)
    if k > MAX_CLASSES:
        raise ChecksumMismatch(f"{what}: {k} classes")
    profiles, dicts = [], []
    for _ in range(k):
        if pos >= len(buf) or buf[pos] > 1:
            raise ChecksumMismatch(f"{what}: corrupt")
        d = None
        if buf[pos] == 1:
            did = buf[pos + 1 : pos + 1 + ID_SIZE]
            d = held.get(did)
            if d is None:
                raise ChecksumMismatch(f"{what}: dictionary {did.hex()} is not held")
            pos += ID_SIZE
        pos += 1
        m, pos = read_varint(buf, pos, what)
        if m > PROFILE_BIGRAMS:
            raise ChecksumMismatch(f"{what}: profile of {m} bigrams")
        pairs, key = [], 0
        for n in range(m):
            gap, pos = read_varint(buf, pos, what)
            if n and not gap:
                raise ChecksumMismatch(f"{what}: corrupt profile")
            key += gap
            pairs.append((key >> _KEY_BITS, key & ((1 << _KEY_BITS) - 1)))
        profiles.append(frozenset(pairs))
        dicts.append(d)
    if pos != len(buf):
        raise ChecksumMismatch(f"{what}: trailing bytes")
    return Classes(tuple(profiles), tuple(dicts))


__all__ = [
    "dictionary_offset",
    "Classes",
    "Dictionary",
    "parse",
    "parse_classes",
    "default",
    "choose",
    "classes",
    "profile",
    "fit",
    "DEFAULT_TOKENS",
    "TUNED_TOKENS",
    "ID_SIZE",
    "MAX_CLASSES",
]


def dictionary_offset(payload) -> int | None:
    """Where the dictionary id of an LM payload stands (codec.py's layout: version 4 right after
    the version byte; versions 5-6, when their head's flag bit 0 says one is named, right after
    the head varint), None if it names none or is too short to say. Only the bytes before the id
    decide it, so it is the same offset in a payload whose id a store has cut out (container.py's
    compact form with a dictionary number): the store cuts the id out and puts it back there.
    Here, not in codec.py, because the store asks it of every LM block it keeps and must not
    import the engine for that."""
    payload = bytes(memoryview(payload)[:8])
    if payload[:1] == b"\x04":
        return 1
    if len(payload) < 2 or payload[0] not in (5, 6):
        return None
    try:
        head, pos = read_varint(payload, 1, "LM payload head")
    except ContainerError:
        return None
    return pos if head & 1 else None
