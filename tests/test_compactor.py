"""Compaction in-process, with a bigram test model fitted to the text (so the LM container wins):
cold blocks shrink below zstd, read back identical, binary blocks are left alone, a block rewritten
while it is compacted keeps the newer data, and the store's invariants hold."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from llmfs.codec import LM, Registry
from llmfs.codec.lm import ByteTokenizer, LMCodec
from llmfs.codec.registry import peek_header

from llmfs import fsck
from llmfs import namespace as ns
from llmfs.compactor import Compactor
from llmfs.store import ROOT_INO

from .fake_engine import BigramEngine

BS = 16384


def markov_text(n: int, seed: int = 7) -> bytes:
    """Text a bigram model predicts well (1 bit per byte) but zstd does not (6 bits of unigram
    entropy, few long repeats): so the LM container wins, as it does on real text with SmolLM2."""
    rng = random.Random(seed)
    alphabet = [ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."]
    nxt = {a: rng.sample(alphabet, 2) for a in alphabet}
    out, c = bytearray(), alphabet[0]
    for _ in range(n):
        c = nxt[c][rng.random() < 0.5]
        out.append(c)
    return bytes(out)


TEXT = markov_text(6 * BS)


@pytest.fixture
def env(new_fs):
    registry = Registry()
    fs = new_fs(BS, registry)
    store = fs.store
    codec = LMCodec((BigramEngine(train=TEXT, max_seq_len=512), ByteTokenizer()), batch=4)
    compactor = Compactor(store, registry, lambda: codec, "test-bigram", compact_after=0)
    yield fs, compactor
    fs.flush_all()
    # the bigram test model has no model file to store (Models embeds real ones): skip that check
    checks = [c for c in fsck.CHECKS if c is not fsck.check_model_embedding]
    problems, _ = fsck.run_checks(store, checks, registry=registry)
    assert not problems, [p.message for p in problems]


def write(fs, name: bytes, data: bytes) -> int:
    fh = fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, data, 0)
    fs.release(fh)
    return fs.lookup(ROOT_INO, name)


def codecs_of(fs, ino):
    with fs.store.read() as t:
        return [peek_header(t.container(h)).codec_id for h in t.block_hashes(ino, 0, 1 << 40).values()]


def test_compaction_shrinks_text_and_keeps_bytes(env):
    fs, compactor = env
    ino = write(fs, b"gpl", TEXT)
    random_ino = write(fs, b"random", os.urandom(2 * BS))
    with fs.store.read() as t:
        zstd_bytes = t.counters.stored
    res = compactor.compact(compactor.candidates())
    # incompressible blocks were stored raw and never queued: only the text was looked at
    assert res.lm_blocks == res.blocks == 6 and res.after < res.before / 2
    assert set(codecs_of(fs, ino)) == {LM}
    assert LM not in codecs_of(fs, random_ino)  # incompressible: left raw, never grown
    with fs.store.read() as t:
        assert t.counters.stored < zstd_bytes and not list(t.pending())
        assert list(t.models().values()) == ["test-bigram"]
    fs.cache = None  # read through the LM, not the cache
    assert fs.read_ino(ino, len(TEXT) + 1, 0) == TEXT
    assert compactor.compact(compactor.candidates()).blocks == 0  # nothing left to do


def test_compaction_respects_age_and_paths(env):
    fs, compactor = env
    a = write(fs, b"a", TEXT[:BS])
    write(fs, b"b", TEXT[BS : 2 * BS])
    assert compactor.candidates(older_than=3600) == []
    assert len(compactor.candidates(older_than=0, inos=[a])) == 1


def test_block_rewritten_during_compaction_keeps_newer_data(env):
    fs, compactor = env
    ino = write(fs, b"f", TEXT[: 2 * BS])
    codec = compactor._lm_codec()
    newer = TEXT[2 * BS : 4 * BS]
    real_encode = codec.encode

    raced = []

    def encode_and_race(data):
        if not raced:  # once, while the model "runs"
            raced.append(1)
            fh = fs.open(ino, os.O_RDWR)
            fs.write(fh, newer, 0)
            fs.release(fh)
        return real_encode(data)

    codec.encode = encode_and_race
    res = compactor.compact(compactor.candidates())
    assert res.changed == 2 and res.lm_blocks == 0
    fs.cache = None
    assert fs.read_ino(ino, 4 * BS, 0) == newer
    codec.encode = real_encode
    assert compactor.compact(compactor.candidates()).lm_blocks == 2
    assert fs.read_ino(ino, 4 * BS, 0) == newer


def test_failed_verification_keeps_the_old_block(env, caplog):
    fs, compactor = env
    ino = write(fs, b"f", TEXT[:BS])
    codec = compactor._lm_codec()
    real = codec.decode_many
    codec.decode_many = lambda items: [b"x" * n for _, n in items]  # a broken decoder
    res = compactor.compact(compactor.candidates())
    codec.decode_many = real
    assert res.lm_blocks == 0 and "verification" in caplog.text
    assert LM not in codecs_of(fs, ino)
    assert fs.read_ino(ino, BS, 0) == TEXT[:BS]


def test_storage_xattrs(env):
    fs, compactor = env
    ino = write(fs, b"f", TEXT[: 2 * BS])
    assert fs.getxattr(ino, b"user.llmfs.codec") == b"zstd"
    before = int(fs.getxattr(ino, b"user.llmfs.stored_size"))
    compactor.compact(compactor.candidates())
    assert fs.getxattr(ino, b"user.llmfs.codec") == b"lm"
    assert int(fs.getxattr(ino, b"user.llmfs.stored_size")) < before / 2
    assert fs.listxattr(ino) == []  # not listed: cp -a must not copy them
    with pytest.raises(ns.NotPermitted):
        fs.setxattr(ino, b"user.llmfs.codec", b"raw")


def test_opening_an_lm_file_prefetches_its_blocks_in_one_batch(env):
    from llmfs.cache import DecodeCache, Readahead

    fs, compactor = env
    ino = write(fs, b"f", TEXT[: 4 * BS])
    compactor.compact(compactor.candidates())
    fs = ns.Filesystem(fs.store, fs.registry, DecodeCache(64 << 20), readahead=Readahead())
    try:
        fh = fs.open(ino, os.O_RDONLY)
        assert fs.cache.wait_prefetch(30)
        m = fs.cache.metrics()
        assert m["prefetched"] == 4 and m["prefetch_batches"] == 1
        assert fs.read(fh, 4 * BS, 0) == TEXT[: 4 * BS]
        assert fs.cache.metrics()["decoded_blocks"] == 4  # the read decoded nothing more
        fs.release(fh)
    finally:
        fs.cache.close()


def test_walking_a_directory_decodes_the_next_files_in_one_batch(env):
    """A reader opening a directory's small LM-coded files in name order (cp -r, tar, grep -r)
    gets the next files' blocks decoded in the batch of the second file it opens, instead of one
    tiny batch per file; opening files out of order prefetches nothing beyond the file itself."""
    from llmfs.cache import DecodeCache, Readahead

    fs, compactor = env
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    files = {f"f{i:02}".encode(): TEXT[i * 2000 : i * 2000 + 1500] for i in range(12)}
    for name, data in files.items():
        fh = fs.create(d, name, 0o644, os.O_RDWR, 0, 0)
        fs.write(fh, data, 0)
        fs.release(fh)
    compactor.compact(compactor.candidates())
    names = sorted(files)
    fs = ns.Filesystem(fs.store, fs.registry, DecodeCache(64 << 20), readahead=Readahead())
    try:
        got = {}
        for k, name in enumerate(names):
            fh = fs.open(fs.lookup(d, name), os.O_RDONLY)
            got[name] = fs.read(fh, 1 << 20, 0)
            fs.release(fh)
            if k == 1:  # the second file opened in order: the next ones are on their way
                assert fs.cache.wait_prefetch(30)
        assert got == files
        m = fs.cache.metrics()
        # f00 alone, f01 (by its reader or with the rest), f02..f11 in one batch
        assert m["decoded_blocks"] == 12 and m["decodes"] <= 3, m
    finally:
        fs.cache.close()
    fs = ns.Filesystem(fs.store, fs.registry, DecodeCache(64 << 20), readahead=Readahead())
    try:
        for name in (names[5], names[2], names[7]):  # out of order: no walk
            fh = fs.open(fs.lookup(d, name), os.O_RDONLY)
            assert fs.read(fh, 1 << 20, 0) == files[name]
            fs.release(fh)
        assert fs.cache.wait_prefetch(30)
        m = fs.cache.metrics()
        assert m["decoded_blocks"] == 3 and m["decodes"] == 3, m
    finally:
        fs.cache.close()


def test_mixed_tree_never_grows(env):
    """Text, an ELF binary, random bytes and zeros: compaction may only shrink the store."""
    fs, compactor = env
    write(fs, b"text", TEXT[: 3 * BS])
    write(fs, b"ls", Path("/bin/ls").read_bytes()[: 4 * BS])
    write(fs, b"random", os.urandom(BS + 123))
    write(fs, b"zeros", bytes(2 * BS))
    with fs.store.read() as t:
        before = t.counters.stored
    res = compactor.compact(compactor.candidates())
    with fs.store.read() as t:
        after = t.counters.stored
    assert after <= before and res.after <= res.before
    assert fs.read_ino(fs.lookup(ROOT_INO, b"ls"), 4 * BS, 0) == Path("/bin/ls").read_bytes()[: 4 * BS]
