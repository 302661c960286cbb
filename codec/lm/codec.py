"""The LM codec: bytes -> tokens -> independent segments -> arithmetic-coded words, and back.

It implements the registry's `ModelCodec` protocol (codec/registry.py): `fingerprint`, `encode(data)`,
`decode_many([(payload, length)])`. The container around the payload (magic, length, checksum, model
fingerprint) is codec/container.py's; this module owns only the payload.

Payload format (versions 5 and 6, what encode writes; varint = unsigned LEB128):

    u8       payload version (5 or 6; 4, 3, 2 and 1 are still read)
    varint   N << 2 | flags: N = total token count; flags bit 0: a dictionary id follows,
             bit 1: the segment shape follows (else the version 5 default shape)
    8 bytes  (flags bit 0) the id of the dictionary every segment continues (dictionary.py)
    varint   (flags bit 1) segment length S in tokens, BOS excluded
    varint   (flags bit 1) group size G (1 <= G <= MAX_GROUP)
    bytes    (version 6, more than one group) ceil(groups / 8) bytes of bits, little-endian from
             the first byte's lowest bit: bit k set = group k is coded bare
    varint × (groups - 1)  byte length of each group's coded stream but the last (the last
             stream is the rest of the payload)
    bytes    the groups' streams, concatenated in group order; each is its 32-bit coder words
             big-endian with the trailing zero bytes cut (coder.StreamEncoder.sealed_bytes: the
             last word is the "roundest" point of the coder's final interval)

Default shape (frozen for version 5, whatever later defaults become): S = min(V5_SEGMENT_TOKENS,
the model's window - the dictionary's tokens) - 1, G = V5_GROUP_SEGMENTS. Version 5 exists for the
fixed bytes of small blocks (each is ~0.1 % of an 8 KiB text's payload): against version 3/4 it
drops S and G (3 bytes) and the last group's table entry (1-2 bytes), codes the dictionary's
presence in a flag instead of a version, and cuts ~1.7 bytes per stream from the coder's flush. Its
rows go through mixer.GroupMixerV5 (the version 3 mixer plus the changes its docstring lists). A
payload whose last stream is cut short or has bytes appended still decodes (to wrong tokens, which
the length check or the registry's checksum refuses — or, for appended zero bytes, to the same
tokens), so "truncated" is only reported where the table itself is cut.

Version 6 is version 5 in which some groups are coded with the LM's rows alone (no mixer): the
side models cost bits on text they cannot predict (a Python module whose repeats the LM already
sees), and the rows are the same for both codings, so the encoder codes each group both ways from
the one forward pass (coder.StreamEncoder.encode's `unpatched` stream: constriction's work twice,
the engine's once) and keeps the shorter stream; the payload is version 5 when every group's mixed
stream is the shorter, else version 6 when that is smaller. A one-group payload (every block of up
to G segments: a 64 KiB block of text) spends no byte on the choice — its version says it. The
decoder runs a bare group's rows with no mixer, exactly as a version 2 segment's. So the full
codec is never above the bare model's coding by more than the choice's bits.

Version 4 (still read) is version 3 with a store dictionary, named by the 8 bytes after the version
byte: every segment continues the dictionary's tokens (BOS + dictionary is the engine prefix whose
KV state is computed once per codec and copied into each row: engine.Engine.prefix), and each
group's mixer is primed with them (version 5 does the same when its flag says so). A store may
hold several dictionaries (dictionary.Classes, `llmfs tune`): the encoder then picks one per block
from its tokens, or none, and the payload names the one it picked; decoding is the same. Version 3
(still read):

    u8       payload version
    varint   total token count N
    varint   segment length S in tokens, BOS excluded (every segment but the last holds S tokens)
    varint   group size G: consecutive segments that share one coded stream (1 <= G <= MAX_GROUP)
    varint × ceil(ceil(N / S) / G)   number of 32-bit words of each group's coded stream
    u32le ×  ...           the groups' words, concatenated in group order

It codes each group's stream with the LM's rows mixed with online side models (mixer.GroupMixer: a
match model, token n-gram counts and a logistic mixer, learned from the group's own earlier tokens
in coding order, exact integer arithmetic). Version 2 is version 3's layout with the bare LM's
rows. Version 1 (still read) is version 2 without the G field and with G = 1: one stream per
segment.

Invariants:
  * a segment is coded independently: its tokens are predicted from BOS (+ the dictionary, version
    4) + the segment's own earlier tokens only, so segments encode in one parallel pass and decode many at a time;
  * a group's stream holds its segments' tokens position-major (coder.encode_interleaved): token t
    of each of its segments in segment order, then token t+1 — so the group's segments decode side
    by side, in rows of one engine state that start together. Sharing a stream saves each further
    segment its own flush (~2 bytes) and table entry (~2 bytes): ~0.7-0.9 % of the payload on text;
  * the token stream is the tokenizer's encoding of the whole block, cut every S tokens (an escape
    sequence of the tokenizer may straddle a cut — tokens are detokenized per block, not per segment);
  * the words depend only on the bytes, the model, S, G and the version — never on batch size,
    threads or device (the engine's frequency rows are bit-identical across those, and the mixer's
    state depends only on the group's tokens in coding order; tests pin it);
  * a mixed group's side models (version 3-5) see only that group's tokens (and the dictionary's):
    groups, and blocks, decode on their own;
  * a payload that is truncated, has trailing bytes, or decodes to the wrong length raises a
    ContainerError subclass; the registry then also checks the plaintext checksum.

Threading: one engine is shared by every thread that uses this codec; engine work is serialized by a
lock (the engine parallelizes inside a call with torch's intra-op threads, and one big batch uses the
cores better than two interleaved small ones). Tokenization, payload parsing and encoding's arithmetic
coding run outside the lock; a decode holds it from `start` to its last `step`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..container import (
    FINGERPRINT_SIZE,
    ChecksumMismatch,
    ModelMismatch,
    Truncated,
    UnsupportedVersion,
    read_varint,
    varint,
)
from . import DECODE_BATCH, coder
from . import dictionary as dictionaries
from .dictionary import Dictionary, dictionary_offset
from .mixer import GroupMixer, GroupMixerV5, line_breaks
from .tokenizer import from_json

PAYLOAD_VERSION = 6  # what encode writes: version 5, or version 6 where a group codes smaller bare
MIXED_VERSIONS = frozenset({3, 4, 5})  # payload versions whose rows all go through a mixer
READ_VERSIONS = (1, 2, 3, 4, 5, 6)
# The version 5 default segment shape (flags bit 1 clear): part of the format, never changed.
V5_SEGMENT_TOKENS = 1024  # BOS included; S = min(this, window - dictionary) - 1
V5_GROUP_SEGMENTS = 32
_V5_DICTIONARY = 1  # flags (dictionary.dictionary_offset reads this bit too: the store asks it)
_V5_SHAPE = 2
# Hashed into the codec fingerprint; the payload carries its own version, so readers of version 3
# also read version 1 and 2 payloads made with the same model.
_FINGERPRINT_TAG = b"llmfs-lm-payload-1\0"
_TABLE = "LM payload segment table"  # what read_varint's errors name

# Segments per coded stream. A group decodes in rows that start together, so decoding takes at
# least G rows whatever the batch (the KV cache: 23.6 MB per SmolLM2 row); encoding holds only the
# group's hidden states (4.7 MB per segment). Each stream costs a flush (~2 bytes) and a table
# entry (~2 bytes): for the bare model, 1 to 4 segments per stream saved well over half a percent,
# 4 to 16 a further ~0.1 % (docs/benchmarks.md, "LM codec parameters"). With the mixer a group is
# also what its side models learn from: a 64 KiB block of a package list (23 segments) codes 2 %
# smaller as one group of 32 than as 16 + 7 (docs/benchmarks.md, session 6). 32 makes every 64 KiB
# block of text (15-32 segments) one stream; decoding it takes as many rows, within the default
# decode batch (64) — a smaller --batch is raised to the group's segment count.
GROUP_SEGMENTS = 32
MAX_GROUP = 64  # a reader refuses more: a garbled G must not ask for thousands of rows

# Tokens per segment, BOS included. Longer segments give the model more context (fewer bits per byte)
# and amortize the per-segment overhead (~1 coded word + a 2-byte table entry); shorter ones give a
# block more rows to decode in parallel (a cold read's latency is ~ segment length × step time) and a
# smaller KV cache. Each doubling from 256 saves less (docs/benchmarks.md, "LM codec parameters"):
# 2048 would save a few percent but doubles read latency and KV memory per row and leaves a 64 KiB
# block only ~7 rows; 1024 it is.
SEGMENT_TOKENS = 1024


# Binary-looking data is not worth a model pass: if more than this fraction of a sample is invalid
# UTF-8 or control characters other than \t \n \r \f, encode() returns None at once and the
# registry keeps zstd/raw. Text (incl. source code and man-page groff) stays far below 1 %.
BINARY_FRACTION = 0.10
_BINARY_SAMPLE = 4096
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\x1b")


def _looks_binary(data: bytes) -> bool:
    sample = data[:_BINARY_SAMPLE]
    if not sample:
        return False
    text = sample.decode("utf-8", "surrogateescape")
    bad = sum(1 for c in text if (ord(c) < 32 and ord(c) not in _TEXT_CONTROLS) or 0xDC80 <= ord(c) <= 0xDCFF)
    return bad > BINARY_FRACTION * len(text)


@dataclass
class _Group:
    item: int  # which payload of decode_many it belongs to
    tokens: list[int]  # each segment's token count, BOS excluded
    words: np.ndarray  # their coded stream
    mixed: bool = False  # version 3-5: rows go through a mixer
    dictionary: Dictionary | None = None  # version 4, 5: the context every segment continues
    version: int = 3  # the payload's version (which mixer)


class LMCodec:
    def __init__(
        self,
        model,
        batch: int = DECODE_BATCH,
        threads: int | None = None,
        segment_tokens: int = SEGMENT_TOKENS,
        dictionary: Dictionary | str | None = None,
    ):
        """`model` is a loader.LoadedModel (.engine, .tokenizer_json) or an (engine, tokenizer) pair.
        `dictionary`: what encode continues (version 4): a Dictionary, "default" (the built-in
        one, dictionary.default) or None (version 3). The codec decodes the dictionaries it was
        given (add_dictionary) and the built-in default."""
        if isinstance(model, tuple):
            self.engine, self.tokenizer = model
        else:
            self.engine, self.tokenizer = model.engine, from_json(model.tokenizer_json)
        if self.tokenizer.vocab_size > self.engine.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} ids, the model only {self.engine.vocab_size}"
            )
        self.batch = max(1, int(batch))
        if getattr(self.engine, "fused", False):
            # CPU kernels: the engine's own threads, which never spin-wait (torch's OpenMP workers
            # spin between calls and starve a shared machine); default: every core we may use
            self.engine.threads = int(threads) if threads else len(os.sched_getaffinity(0))
            torch.set_num_threads(1)
        elif threads:
            torch.set_num_threads(int(threads))
        self.segment_tokens = min(segment_tokens, self.engine.max_seq_len)  # BOS included
        if self.segment_tokens < 2:
            raise ValueError("segments need room for BOS and one token")
        self.group = GROUP_SEGMENTS
        # what encode writes: 6 (version 5 or 6, whichever is smaller: mixed, and bare where that
        # codes a group smaller; self.dictionary if any), 5 (every group mixed), 4 (mixed, with
        # self.dictionary; 3 without one), 3 or 2 (bare model)
        self.version = PAYLOAD_VERSION
        self.dictionaries: dict[bytes, Dictionary] = {}  # id -> dictionary this codec decodes
        self._prefixes: dict[bytes, object] = {}  # id -> engine.Prefix, made on first use
        self.dictionary: Dictionary | None = None
        self.classes: dictionaries.Classes | None = None  # several dictionaries, picked per block
        self._breaks: frozenset[int] | None = None  # GroupMixerV5's line breaks, made on first use
        self.default_dictionary: Dictionary | None = None  # the built-in one, where the engine has prefix()
        if hasattr(self.engine, "prefix"):
            d = dictionaries.default(self.tokenizer, self.engine.max_seq_len)
            if d.tokens:  # a window of fewer than 4 positions has no room for one
                self.default_dictionary = d
                self.add_dictionary(d)
            if dictionary == "default":
                dictionary = self.default_dictionary
            if dictionary is not None:
                self.use_dictionary(dictionary)
        elif dictionary is not None:
            raise ValueError("this engine cannot continue a dictionary (no prefix entry point)")
        # the first 8 bytes of a 16-byte digest: version 1 containers carry all 16 (container.py)
        self.fingerprint = hashlib.blake2b(
            _FINGERPRINT_TAG + bytes(self.engine.fingerprint) + b"\0" + self.tokenizer.identity,
            digest_size=16,
        ).digest()[:FINGERPRINT_SIZE]
        self._engine_lock = threading.Lock()

    # -- dictionaries ---------------------------------------------------------------------------
    def add_dictionary(self, d: Dictionary) -> None:
        """Let this codec decode payloads that name `d` (a store adds the ones it holds)."""
        if not 1 <= len(d.tokens) <= dictionaries.MAX_TOKENS or max(d.tokens) >= self.engine.vocab_size:
            raise ValueError("dictionary tokens out of range for this model")
        if len(d.tokens) + 2 > self.engine.max_seq_len:
            raise ValueError("dictionary longer than this model's window")
        if (
            len(d.extension) > dictionaries.MAX_EXTENSION
            or max(d.extension, default=0) >= self.engine.vocab_size
        ):
            raise ValueError("dictionary extension out of range for this model")
        self.dictionaries.setdefault(d.id, d)

    def use_dictionary(self, d: Dictionary | None) -> None:
        """What encode continues from now on (None: no dictionary, version 3 payloads); drops the
        classes use_classes gave."""
        if d is not None:
            self.add_dictionary(d)
        self.dictionary = d
        self.classes = None

    def use_classes(self, classes: dictionaries.Classes | None) -> None:
        """Several dictionaries: from now on encode continues, per block, the dictionary of the
        class the block's start matches (dictionary.Classes.pick; none where no class matches or
        the class has none). None: back to the single dictionary of use_dictionary."""
        if classes is not None:
            for d in classes.dictionaries:
                if d is not None:
                    self.add_dictionary(d)
        self.classes = classes

    def _prefix(self, d: Dictionary):
        """The engine prefix of `d`: BOS + its tokens but the last (the last is each row's first
        input, at position len(d.tokens)). Call with the engine lock held."""
        p = self._prefixes.get(d.id)
        if p is None:
            p = self._prefixes[d.id] = self.engine.prefix([self.engine.bos_id, *d.tokens[:-1]])
        return p

    def _segment_len(self, d: Dictionary | None) -> int:
        """Tokens per segment, BOS included, after dictionary `d`."""
        return (
            self.segment_tokens
            if d is None
            else min(self.segment_tokens, self.engine.max_seq_len - len(d.tokens))
        )

    # -- encode ---------------------------------------------------------------------------------
    def encode(self, data: bytes) -> bytes | None:
        """The payload, or None for binary-looking data (the registry then keeps zstd or raw; it
        also keeps whichever container is smallest, so None is only a shortcut)."""
        data = bytes(data)
        if _looks_binary(data):
            return None
        return self.encode_payload(data)

    def encode_payload(self, data: bytes) -> bytes:
        """Always LM-code `data` (tests use it on adversarial bytes that encode() would skip)."""
        if self.version not in (2, 3, 4, 5, 6):
            raise ValueError(f"cannot write LM payload version {self.version}")
        version, d = self.version, self.dictionary
        tokens = self.tokenizer.encode(bytes(data))
        if self.classes is not None:  # several dictionaries: this block's pick (or none)
            d = self.classes.pick(tokens)
        if version == 4 and d is None:
            version = 3
        if version not in (4, 5, 6):
            d = None
        segments = self._cut(tokens, d)
        if version in (5, 6):
            return self._encode_v5(segments, d, choose=version == 6)
        streams = self._encode_groups(segments, version in MIXED_VERSIONS, d)
        head = [
            bytes([version]) + (d.id if d is not None else b""),
            varint(sum(len(s) for s in segments)),
            varint(self._segment_len(d) - 1),
            varint(self.group),
        ]
        head += [varint(len(words)) for words in streams]
        return b"".join(head) + b"".join(w.astype("<u4").tobytes() for w in streams)

    def _encode_v5(self, segments: list[list[int]], d: Dictionary | None, choose: bool = False) -> bytes:
        """A version 5 payload; `choose`: each group also coded bare (from the same rows) and the
        payload written as version 6 if that is smaller (see the module docstring)."""
        pairs = self._encode_streams(segments, 5, d, bare_too=choose)
        total = sum(len(s) for s in segments)
        if not choose:
            return self._v5_layout(5, [e.sealed_bytes() for e in pairs], d, [], total)
        mixed = [m.sealed_bytes() for m, _ in pairs]
        bare = [b.sealed_bytes() for _, b in pairs]
        flags = [len(b) < len(m) for m, b in zip(mixed, bare)]
        best = self._v5_layout(5, mixed, d, [], total)
        if any(flags):
            v6 = self._v5_layout(6, [b if f else m for m, b, f in zip(mixed, bare, flags)], d, flags, total)
            if len(v6) < len(best):
                best = v6
        return best

    def _v5_layout(
        self, version: int, streams: list[bytes], d: Dictionary | None, bare: list[bool], total: int
    ) -> bytes:
        """Version 5 (or 6: `bare` = which groups are coded with the LM's rows alone) around the
        groups' sealed streams."""
        per_seg = self._segment_len(d) - 1
        flags = _V5_DICTIONARY if d is not None else 0
        shape = b""
        if (per_seg, self.group) != (self._v5_default_segment(d), V5_GROUP_SEGMENTS):
            flags |= _V5_SHAPE
            shape = varint(per_seg) + varint(self.group)
        head = [
            bytes([version]),
            varint(total << 2 | flags),
            d.id if d is not None else b"",
            shape,
            _bitmap(bare) if version == 6 and len(bare) > 1 else b"",
        ]
        head += [varint(len(b)) for b in streams[:-1]]
        return b"".join(head) + b"".join(streams)

    def _v5_default_segment(self, d: Dictionary | None) -> int:
        """S (BOS excluded) of a version 5 payload whose shape flag is clear."""
        return min(V5_SEGMENT_TOKENS, self.engine.max_seq_len - (len(d.tokens) if d else 0)) - 1

    def segments(self, data: bytes, d: Dictionary | None = None) -> list[list[int]]:
        """The token ids of `data` cut into the segments the payload codes (BOS not included),
        after dictionary `d`."""
        return self._cut(self.tokenizer.encode(bytes(data)), d)

    def _cut(self, tokens: list[int], d: Dictionary | None) -> list[list[int]]:
        per_seg = self._segment_len(d) - 1
        return [tokens[i : i + per_seg] for i in range(0, len(tokens), per_seg)]

    def _encode_groups(
        self, segments: list[list[int]], mixed: bool = False, d: Dictionary | None = None
    ) -> list[np.ndarray]:
        """The words of each group's stream (versions 1-4; `mixed`: version 3's mixer)."""
        return [e.words() for e in self._encode_streams(segments, 3 if mixed else None, d)]

    def _new_mixer(self, version: int, n_segments: int, d: Dictionary | None) -> GroupMixer:
        """The mixer of one group of a mixed payload version (3 and 4 share the first one)."""
        primer = d.primer if d is not None else ()
        if version != 5:
            return GroupMixer(n_segments, primer)
        if self._breaks is None:
            self._breaks = line_breaks(self.tokenizer, self.tokenizer.vocab_size)
        return GroupMixerV5(n_segments, primer, self._breaks)

    def _encode_streams(
        self,
        segments: list[list[int]],
        mixer: int | None = None,
        d: Dictionary | None = None,
        bare_too: bool = False,
    ) -> list:
        """One coded stream per group of self.group consecutive segments. One parallel engine pass
        gives a group's final hidden states (engine.hidden: 4.7 MB per SmolLM2 segment); the LM
        head then runs on ENCODE_CHUNK_ROWS of them at a time, in the stream's position-major
        order, and each chunk is coded as it comes. The encoder never holds whole frequency tables
        (201 MB per segment) — so a group can be as large as its decoder's rows allow — and reuses
        one output buffer instead of faulting in fresh pages for every segment. `mixed`: each
        chunk's rows then go through the group's GroupMixer, row by row in coding order (the
        encoder knows every token, so the mixer learns from each as the decoder will; `mixer` is the
        payload version whose mixer it is). `d`: every
        segment continues this dictionary (the engine's prefix; the mixer primed with it).
        `bare_too` (with a mixer): each group is also coded with the LM's rows alone, from the same
        rows, and each item of the list is the pair (mixed stream, bare stream)."""
        engine, streams, out = self.engine, [], None
        first = engine.bos_id if d is None else d.tokens[-1]  # each row's input at its position 0
        for a in range(0, len(segments), self.group):
            group = segments[a : a + self.group]
            width = 1 + max(len(s) for s in group)
            # BOS (or the dictionary's last token) + tokens, right-padded with BOS (padding never
            # affects real positions)
            batch = torch.full((len(group), width), engine.bos_id, dtype=torch.long)
            batch[:, 0] = first
            for r, seg in enumerate(group):
                batch[r, 1 : 1 + len(seg)] = torch.tensor(seg, dtype=torch.long)
            with self._engine_lock:
                if d is None:
                    hidden = engine.hidden(batch.to(engine.device))  # (n, width, D)
                else:
                    hidden = engine.hidden(batch.to(engine.device), prefix=self._prefix(d))
            hidden = hidden.view(len(group) * width, -1)
            if out is None:
                out = torch.empty(
                    coder.ENCODE_CHUNK_ROWS, engine.vocab_size, dtype=torch.int32, device=engine.device
                )
            order = coder.interleaved_order([len(s) for s in group])
            encoder = coder.StreamEncoder()
            bare = coder.StreamEncoder() if bare_too and mixer is not None else None
            mixing = self._new_mixer(mixer, len(group), d) if mixer is not None else None
            for lo in range(0, len(order), coder.ENCODE_CHUNK_ROWS):
                chunk = order[lo : lo + coder.ENCODE_CHUNK_ROWS]
                at = torch.tensor([j * width + t for j, t in chunk], device=hidden.device)
                with self._engine_lock:  # row t of a segment predicts its token t
                    rows = engine.head(hidden[at], out[: len(chunk)])
                rows = rows.cpu().numpy()
                symbols = [group[j][t] for j, t in chunk]
                patches = None
                if mixing is not None:
                    patches = []
                    totals = rows.sum(axis=1, dtype=np.int64)
                    for i, (j, _t) in enumerate(chunk):
                        cands, masses = mixing.predict(j, rows[i], int(totals[i]))
                        if cands:
                            patches.append((i, cands, masses))
                        mixing.update(j, symbols[i])
                encoder.encode(symbols, rows, patches, unpatched=bare)
            streams.append(encoder if bare is None else (encoder, bare))
        return streams

    # -- decode ---------------------------------------------------------------------------------
    def decode_many(self, items: list[tuple[bytes, int]]) -> list[bytes]:
        """Decode (payload, plaintext length) pairs; all their segments share engine batches."""
        groups: list[_Group] = []
        for i, (payload, length) in enumerate(items):
            groups.extend(self._parse(bytes(payload), i, length))
        tokens = self._decode_groups(groups)
        per_item: list[list[int]] = [[] for _ in items]
        for group, toks in zip(groups, tokens):
            for seg in toks:
                per_item[group.item].extend(seg)
        out = []
        for (_payload, length), toks in zip(items, per_item):
            try:
                data = self.tokenizer.decode(toks)
            except (ValueError, IndexError) as e:  # a token the tokenizer cannot have produced
                raise ChecksumMismatch(f"LM payload is corrupt: {e}") from None
            if len(data) != length:
                raise ChecksumMismatch(f"LM payload decoded to {len(data)} bytes, container says {length}")
            out.append(data)
        return out

    def _parse(self, buf: bytes, item: int, length: int | None = None) -> list[_Group]:
        if not buf:
            raise Truncated("LM payload is empty")
        if buf[0] not in READ_VERSIONS:
            raise UnsupportedVersion(
                f"LM payload version {buf[0]} is not supported (this llmfs "
                f"reads versions {', '.join(map(str, READ_VERSIONS))})"
            )
        if buf[0] in (5, 6):
            return self._parse_v5(buf, item, length)
        d, pos = None, 1
        if buf[0] == 4:
            d = self._dictionary_at(buf, pos)
            pos += dictionaries.ID_SIZE
        total, pos = read_varint(buf, pos, _TABLE)
        if (
            length is not None and total > 3 * length
        ):  # a token stands for at least a third of a byte (tokenizer.py: an
            # escaped byte is 3 tokens): a payload claiming more is damaged, or crafted to hold
            # the engine for hours (the store bounds length by its block size)
            raise ChecksumMismatch(f"LM payload is corrupt: {total} tokens for {length} bytes")
        per_seg, pos = read_varint(buf, pos, _TABLE)
        if per_seg < 1 or per_seg + 1 + (len(d.tokens) if d else 0) > self.engine.max_seq_len:
            raise ChecksumMismatch(f"LM payload is corrupt: segment length {per_seg}")
        g = 1
        if buf[0] >= 2:
            g, pos = read_varint(buf, pos, _TABLE)
            if not 1 <= g <= MAX_GROUP:
                raise ChecksumMismatch(f"LM payload is corrupt: group size {g}")
        count = -(-total // per_seg)  # segments
        n_groups = -(-count // g)
        if n_groups > len(buf):  # each group needs at least one table byte
            raise Truncated("LM payload truncated inside its segment table")
        sizes = []
        for _ in range(n_groups):
            n, pos = read_varint(buf, pos, _TABLE)
            sizes.append(n)
        need = pos + 4 * sum(sizes)
        if len(buf) < need:
            raise Truncated(f"LM payload truncated: {len(buf)} bytes, its table needs {need}")
        if len(buf) > need:
            raise ChecksumMismatch(f"LM payload is corrupt: {len(buf) - need} trailing bytes")
        words = np.frombuffer(buf, dtype="<u4", count=sum(sizes), offset=pos).astype(np.uint32)
        groups, start = [], 0
        for k, n in enumerate(sizes):
            tokens = [min(per_seg, total - s * per_seg) for s in range(k * g, min(count, k * g + g))]
            groups.append(_Group(item, tokens, words[start : start + n], buf[0] in MIXED_VERSIONS, d, buf[0]))
            start += n
        return groups

    def _dictionary_at(self, buf: bytes, pos: int) -> Dictionary:
        if len(buf) < pos + dictionaries.ID_SIZE:
            raise Truncated("LM payload truncated inside its dictionary id")
        did = buf[pos : pos + dictionaries.ID_SIZE]
        d = self.dictionaries.get(did)
        if d is None:  # the store lost it, or another store's block: nothing else decodes it
            raise ModelMismatch(f"LM payload names dictionary {did.hex()}, which this store does not hold")
        return d

    def _parse_v5(self, buf: bytes, item: int, length: int | None) -> list[_Group]:
        head, pos = read_varint(buf, 1, _TABLE)
        total, flags = head >> 2, head & 3
        if length is not None and total > 3 * length:  # as in _parse
            raise ChecksumMismatch(f"LM payload is corrupt: {total} tokens for {length} bytes")
        d = None
        if flags & _V5_DICTIONARY:
            d = self._dictionary_at(buf, pos)
            pos += dictionaries.ID_SIZE
        if flags & _V5_SHAPE:
            per_seg, pos = read_varint(buf, pos, _TABLE)
            g, pos = read_varint(buf, pos, _TABLE)
        else:
            per_seg, g = self._v5_default_segment(d), V5_GROUP_SEGMENTS
        if per_seg < 1 or per_seg + 1 + (len(d.tokens) if d else 0) > self.engine.max_seq_len:
            raise ChecksumMismatch(f"LM payload is corrupt: segment length {per_seg}")
        if not 1 <= g <= MAX_GROUP:
            raise ChecksumMismatch(f"LM payload is corrupt: group size {g}")
        count = -(-total // per_seg)
        n_groups = -(-count // g)
        if n_groups > len(buf) + 1:  # each group but the last needs at least one table byte
            raise Truncated("LM payload truncated inside its segment table")
        bare = [False] * n_groups
        if buf[0] == 6:  # which groups are coded bare: one group needs no bit (it is)
            bare = [True] * n_groups
            if n_groups > 1:
                nbytes = -(-n_groups // 8)
                if pos + nbytes > len(buf):
                    raise Truncated("LM payload truncated inside its bare-group bits")
                bits = int.from_bytes(buf[pos : pos + nbytes], "little")
                bare = [bool(bits >> k & 1) for k in range(n_groups)]
                pos += nbytes
        sizes = []
        for _ in range(n_groups - 1):
            n, pos = read_varint(buf, pos, _TABLE)
            sizes.append(n)
        if pos + sum(sizes) > len(buf):
            raise Truncated(f"LM payload truncated: {len(buf)} bytes, its table needs {pos + sum(sizes)}")
        if n_groups:
            sizes.append(len(buf) - pos - sum(sizes))
        elif pos < len(buf):
            raise ChecksumMismatch(f"LM payload is corrupt: {len(buf) - pos} trailing bytes")
        groups = []
        for k, n in enumerate(sizes):
            tokens = [min(per_seg, total - s * per_seg) for s in range(k * g, min(count, k * g + g))]
            words = coder.words_from_bytes(buf[pos : pos + n])
            groups.append(_Group(item, tokens, words, not bare[k], d, 5))
            pos += n
        return groups

    def _decode_groups(self, groups: list[_Group]) -> list[list[list[int]]]:
        """Token ids of each segment of each group. Groups decode side by side in the rows of one
        KV-cached engine state, longest first, each in as many rows as it has segments, started
        together; a row whose segment ends goes back to the pool, and a waiting group starts as
        soon as enough rows are free (engine.reset_rows), so the rows stay busy until the queue
        runs dry. Rows are independent in the engine, so any layout gives the same tokens; the
        state has `batch` rows, or the largest group's count if that is more."""
        engine = self.engine
        out = [[[] for _ in g.tokens] for g in groups]
        queue = sorted(
            (k for k, g in enumerate(groups) if sum(g.tokens) > 0), key=lambda k: -max(groups[k].tokens)
        )
        if not queue:
            return out
        n_rows = max(
            min(self.batch, sum(len(groups[k].tokens) for k in queue)),
            max(len(groups[k].tokens) for k in queue),
        )
        free = list(range(n_rows))
        # group -> its rows, its stream's decoder, its mixer (versions 3-5) or None
        active: dict[int, tuple[list[int], coder.StreamDecoder, GroupMixer | None]] = {}
        feed = torch.full((n_rows,), engine.bos_id, dtype=torch.long)

        def start_waiting() -> list[int]:
            """Start waiting groups (in queue order) while their rows fit; the rows they took."""
            taken = []
            for k in list(queue):
                need = len(groups[k].tokens)
                if need > len(free):
                    continue
                free.sort()  # lowest rows first: the rows in use stay a prefix
                rows = [free.pop(0) for _ in range(need)]
                d = groups[k].dictionary
                active[k] = (
                    rows,
                    coder.StreamDecoder(groups[k].words),
                    self._new_mixer(groups[k].version, need, d) if groups[k].mixed else None,
                )
                queue.remove(k)
                if d is not None:  # the rows continue the dictionary: its KV state, its last token
                    engine.reset_rows(state, rows, prefix=self._prefix(d))
                    feed[rows] = d.tokens[-1]
                else:
                    engine.reset_rows(state, rows)
                    feed[rows] = engine.bos_id
                taken += rows
            return taken

        with self._engine_lock:
            state = engine.start(
                n_rows,
                max(max(g.tokens) + 1 + (len(g.dictionary.tokens) if g.dictionary else 0) for g in groups),
            )
            start_waiting()
            while active:
                # only the rows up to the last one in use step (idle rows past it would cost a full
                # row each: 1361 steps of 64 rows for 67 segments, a quarter of them idle)
                n = 1 + max(r for rows, _, _ in active.values() for r in rows if r is not None)
                probs = engine.step(state.rows(n), feed[:n].to(engine.device)).cpu().numpy()
                totals = None
                restart = []
                for k in list(active):
                    rows, dec, mixer = active[k]
                    segs = out[k]
                    for j, r in enumerate(rows):  # coder order: the group's segments in order
                        if r is None:
                            continue
                        cands = masses = None
                        if mixer is not None:
                            if totals is None:
                                totals = probs.sum(axis=1, dtype=np.int64)
                            cands, masses = mixer.predict(j, probs[r], int(totals[r]))
                        try:
                            sym = dec.decode(probs[r], cands, masses)
                        except AssertionError:  # constriction: words no model state gives
                            raise ChecksumMismatch(
                                "LM payload is corrupt: its coded words are invalid for this model"
                            ) from None
                        if mixer is not None:
                            mixer.update(j, sym)
                        segs[j].append(sym)
                        feed[r] = sym
                        if len(segs[j]) == groups[k].tokens[j]:
                            rows[j] = None  # this segment is done: its row is free
                            free.append(r)
                    if all(r is None for r in rows):
                        del active[k]
                start_waiting()  # resets its rows itself
                restart += [r for r in free]  # idle rows stay at position 0
                if restart:
                    engine.reset_rows(state, restart)
        return out


def _bitmap(flags: list[bool]) -> bytes:
    """Version 6's bare-group bits: bit k (little-endian, from the first byte's lowest) = group k."""
    return sum(1 << k for k, f in enumerate(flags) if f).to_bytes(-(-len(flags) // 8), "little")


def payload_dictionary(payload) -> bytes | None:
    """The id of the dictionary an LM payload continues (version 4, versions 5-6 with its flag),
    None otherwise or for a payload too short to say. Reads only the first bytes (the compactor
    and fsck scan blocks; 16 bytes suffice: the version byte, a varint of up to 7 bytes and the
    id)."""
    payload = bytes(payload)
    at = dictionary_offset(payload)
    if at is None or len(payload) < at + dictionaries.ID_SIZE:
        return None
    return payload[at : at + dictionaries.ID_SIZE]


__all__ = [
    "dictionary_offset",
    "payload_dictionary",
    "DECODE_BATCH",
    "LMCodec",
    "PAYLOAD_VERSION",
    "READ_VERSIONS",
    "SEGMENT_TOKENS",
]
