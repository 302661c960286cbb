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

Serialized form (`blob`): u8 DICT_FORMAT (1), varint count, count × varint token id.

The heavier alternative, adapting the weights to the store's data (LoRA-style), is weighed in
docs/design.md: it would change the engine's integer tables per store (a model file per store and
per tune), where a dictionary is data the unchanged engine reads.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from ..container import ChecksumMismatch, read_varint, varint

DICT_FORMAT = 1
ID_SIZE = 8
# Dictionary tokens for the built-in default and for tune. Each costs every segment one attended
# key per layer and position (KV memory and decoding attention grow by len/segment length), and
# the priming value of more context falls off fast (docs/benchmarks.md, session 5).
DEFAULT_TOKENS = 192
TUNED_TOKENS = 256
MAX_TOKENS = 1024  # a reader refuses more
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

    @property
    def blob(self) -> bytes:
        return bytes([DICT_FORMAT]) + varint(len(self.tokens)) + b"".join(varint(t) for t in self.tokens)

    @property
    def id(self) -> bytes:
        return hashlib.blake2b(_TAG + self.blob, digest_size=ID_SIZE).digest()


def parse(blob: bytes) -> Dictionary:
    """A serialized dictionary; ChecksumMismatch if it is not one."""
    buf = bytes(blob)
    if not buf or buf[0] != DICT_FORMAT:
        raise ChecksumMismatch("LM dictionary: unknown format")
    n, pos = read_varint(buf, 1, "LM dictionary")
    if not 1 <= n <= MAX_TOKENS:
        raise ChecksumMismatch(f"LM dictionary: {n} tokens")
    toks = []
    for _ in range(n):
        t, pos = read_varint(buf, pos, "LM dictionary")
        toks.append(t)
    if pos != len(buf):
        raise ChecksumMismatch("LM dictionary: trailing bytes")
    return Dictionary(tuple(toks))


def fit(tokens: list[int], max_seq_len: int, limit: int) -> int:
    """How many dictionary tokens a model with this window takes: at most `limit`, and at most a
    quarter of the window (segments keep the rest)."""
    return max(0, min(limit, max_seq_len // 4, len(tokens)))


def default(tokenizer, max_seq_len: int) -> Dictionary:
    """The built-in default for this tokenizer and window."""
    toks = tokenizer.encode(DEFAULT_TEXT.encode())
    return Dictionary(tuple(toks[: fit(toks, max_seq_len, DEFAULT_TOKENS)]))


def choose(samples: list[bytes], tokenizer, max_seq_len: int, limit: int = TUNED_TOKENS) -> Dictionary | None:
    """A dictionary from a store's data (`samples`: the start of some of its files): the lines
    found in the most samples (at least two), most widespread first, then the start of the
    sample that shares the most of those lines, until the token budget is spent. None when the
    samples are empty."""
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
    return Dictionary(tuple(toks)) if toks else None


__all__ = ["Dictionary", "parse", "default", "choose", "fit", "DEFAULT_TOKENS", "TUNED_TOKENS", "ID_SIZE"]
