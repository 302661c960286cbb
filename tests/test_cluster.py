"""Compaction and cold reads on a Ray cluster, against one local cluster this module starts
(shared by its tests, to keep CI fast): a head node with two worker actors, on this machine,
always stopped afterwards (its processes run in a session of their own and the whole session is
killed). The last test stops it in the middle of a read and a compaction.

The workers hold the bigram test model fitted to the text (tests/fake_engine.py), so the LM
container wins as it does on real text, in milliseconds. Each test compacts through the cluster
while the daemon's own codec refuses to encode, so only the cluster can have made the containers,
then reads every file back through a fresh filesystem with a fresh local model and runs fsck.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import pytest
from llmfs.codec import LM, Registry
from llmfs.codec.lm import ByteTokenizer, LMCodec

from llmfs import config, fsck
from llmfs import namespace as ns
from llmfs.cluster import LocalCluster
from llmfs.compactor import Compactor
from llmfs.store import Store

from .conftest import ROOT
from .fake_engine import BigramEngine
from .test_compactor import TEXT, codecs_of, write

BS = 4096  # small blocks: the bigram model decodes in Python, one step per byte

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False


def bigram_codec(delay: float = 0.0, switch: str | None = None, decode_switch: str | None = None) -> LMCodec:
    """The codec the workers and the local daemon share. `delay` seconds per encoded block (while
    the file `switch` exists, when given) make a batch last long enough to kill something in the
    middle of it; a decode call waits while the file `decode_switch` exists (up to 2 minutes)."""
    codec = LMCodec((BigramEngine(train=TEXT, max_seq_len=512), ByteTokenizer()), batch=4)
    if delay:
        real = codec.encode

        def slow(data):
            if switch is None or os.path.exists(switch):
                time.sleep(delay)
            return real(data)

        codec.encode = slow
    if decode_switch:
        real_decode = codec.decode_many

        def slow_decode(items):
            deadline = time.monotonic() + 120
            while os.path.exists(decode_switch) and time.monotonic() < deadline:
                time.sleep(0.1)
            return real_decode(items)

        codec.decode_many = slow_decode
    return codec


def start_cluster() -> LocalCluster:
    return LocalCluster(cpus=2, pythonpath=[str(ROOT)])


def stop_cluster(c: LocalCluster) -> None:
    c.stop()
    assert not c.pids(), "processes of the test's Ray cluster outlived it"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One head and one coder (two workers) for the tests that keep their cluster: workers are
    slow to start (each imports torch). Encoding is slow while the file `slow` exists."""
    if not HAVE_RAY:
        pytest.skip("ray is not installed: `pip install .[cluster]` runs these tests")
    switch = str(tmp_path_factory.mktemp("switch") / "slow")
    c = start_cluster()
    try:
        coder = coder_for(c, functools.partial(bigram_codec, 1.5, switch, switch + "-decode"))
        try:
            yield c, coder, switch
        finally:
            coder.close()
    finally:
        stop_cluster(c)


@pytest.fixture
def env(tmp_path):
    """A store with a tree of text files and one binary file; the daemon's codec cannot encode."""
    Store.create(str(tmp_path / "s"), BS)
    store = Store(str(tmp_path / "s"))
    registry = Registry()
    fs = ns.Filesystem(store, registry)
    local = bigram_codec()

    def refuse(data):
        raise AssertionError("the daemon encoded a block the cluster should have")

    local.encode = refuse
    compactor = Compactor(store, registry, lambda: local, "test-bigram", compact_after=0)
    files = {
        b"a": TEXT[: 3 * BS],
        b"b": TEXT[3 * BS : 5 * BS],
        b"c": TEXT[5 * BS : 6 * BS],
        b"bin": os.urandom(BS),
    }
    inos = {name: write(fs, name, data) for name, data in files.items()}
    yield fs, compactor, files, inos
    if not getattr(fs, "closed_by_test", False):  # tests close it to reopen it fresh
        fs.flush_all()
        store.close()


def coder_for(cluster: LocalCluster, model, workers: int = 2, timeout: float = 60.0):
    from llmfs.cluster import ClusterCoder

    coder = ClusterCoder(cluster.address, model, workers=workers, timeout=timeout, device="cpu")
    coder.start()
    assert coder.stats()["state"] == "ready", coder.stats()
    return coder


def check_fresh(path: str, files: dict, inos: dict) -> None:
    """Every file reads back identical through a fresh filesystem and model; fsck is clean."""
    store = Store(path)
    try:
        registry = Registry()
        registry.add_model(bigram_codec())
        fs = ns.Filesystem(store, registry, None)
        for name, data in files.items():
            assert fs.read_ino(inos[name], len(data) + 1, 0) == data, name
        # the bigram test model has no model file to store: the embedding check is not for it
        checks = [c for c in fsck.CHECKS if c is not fsck.check_model_embedding]
        problems, _ = fsck.run_checks(store, registry=registry, checks=checks)
        assert not problems, [p.message for p in problems]
    finally:
        store.close()


def close_env(fs) -> str:
    fs.flush_all()
    path = fs.store.path
    fs.store.close()
    fs.closed_by_test = True
    return path


def test_tree_compacted_through_cluster_decodes_locally(shared, env):
    fs, compactor, files, inos = env
    _, coder, _ = shared
    before = coder.stats()
    compactor.remote = coder
    res = compactor.compact(compactor.candidates())
    st = coder.stats()
    assert res.lm_blocks == res.blocks == 6
    for name in (b"a", b"b", b"c"):
        assert set(codecs_of(fs, inos[name])) == {LM}
    # both workers encoded, and each verified the other's blocks
    assert all(w["blocks"] for w in st["workers"])
    assert sum(w["verified"] for w in st["workers"]) == 6
    assert st["blocks"] - before["blocks"] == 6
    assert st["local_fallbacks"] == st["mismatches"] == 0
    check_fresh(close_env(fs), files, inos)


def test_worker_killed_in_the_middle_of_a_batch(shared, env):
    fs, compactor, files, inos = env
    _, coder, switch = shared
    compactor.remote = coder
    victim = coder.stats()["workers"][0]["pid"]
    open(switch, "w").close()  # 1.5 s per block: w0 encodes 3 blocks
    try:
        out = {}
        t = threading.Thread(target=lambda: out.update(res=compactor.compact(compactor.candidates())))
        t.start()
        time.sleep(2.0)
        os.kill(victim, signal.SIGKILL)
        t.join(120)
        assert not t.is_alive()
    finally:
        os.unlink(switch)
    st = coder.stats()
    assert out["res"].lm_blocks == 6
    assert st["workers"][0]["failures"] >= 1 and st["retries"] >= 1
    assert st["local_fallbacks"] == 0  # the retry went to the other worker
    check_fresh(close_env(fs), files, inos)


def test_cluster_config_keys(tmp_path):
    """[cluster] in a mount config sets --cluster and its options (no ray needed)."""
    import argparse

    from llmfs import mount

    cfg_path = tmp_path / "m.toml"
    cfg_path.write_text(
        'store = "s"\nmountpoint = "m"\n[cluster]\naddress = "ray://head:10001"\n'
        'workers = 4\ntimeout = "2m"\n'
    )
    parser = argparse.ArgumentParser()
    mount.register(parser.add_subparsers())
    args = parser.parse_args(["mount", "--config", str(cfg_path)])
    cfg = config.load(str(cfg_path))
    config.apply(cfg, args)
    assert (args.cluster, args.cluster_workers, args.cluster_timeout) == ("ray://head:10001", 4, 120)
    assert cfg.not_yet == []
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nworkers = -1\n")
    with pytest.raises(config.ConfigError, match="cluster.workers"):
        config.load(str(bad))


class FakeRemote:
    """A remote coder in-process: encodes with the test model; says which blocks 'another worker'
    verified, which it leaves to the daemon, and which it could not do."""

    def __init__(self, answers):
        self.answers = answers  # per block, in order: "verified" | "unverified" | None
        self.registry = Registry()
        self.registry.add_model(bigram_codec())
        self.calls = 0

    def encode_many(self, datas, fingerprint):
        from llmfs.codec import ZSTD

        self.calls += 1
        out = []
        for data, how in zip(datas, self.answers):
            blob = self.registry.encode(data, (ZSTD, LM), fingerprint)
            out.append(None if how is None else (blob, how == "verified"))
        return out


def test_compactor_hook_verifies_what_the_cluster_did_not(env):
    """No ray needed: the compactor decodes locally exactly the containers the remote coder did
    not verify, encodes locally the blocks it could not do, and keeps every byte."""
    fs, compactor, files, inos = env
    local = compactor._lm_codec()
    del local.encode  # block 6 is the daemon's to encode
    decoded = []
    real_decode = local.decode_many
    local.decode_many = lambda items: decoded.append(len(items)) or real_decode(items)
    compactor.remote = FakeRemote(["verified"] * 3 + ["unverified"] * 2 + [None])
    res = compactor.compact(compactor.candidates())
    assert compactor.remote.calls == 1 and res.lm_blocks == 6
    assert decoded == [3]  # the two unverified and the one encoded here
    check_fresh(close_env(fs), files, inos)


def test_cluster_coder_checks_headers():
    """A container whose header does not describe the block (a worker bug) is never used."""
    from llmfs.codec import ZSTD

    from llmfs.cluster import ClusterCoder

    reg = Registry()
    codec = bigram_codec()
    reg.add_model(codec)
    data = TEXT[:BS]
    good = reg.encode(data, (ZSTD, LM), codec.fingerprint)
    other = reg.encode(TEXT[BS : 2 * BS], (ZSTD, LM), codec.fingerprint)
    coder = ClusterCoder("nowhere:1", "tiny")
    reply = {
        "workers": [],
        "mismatches": 0,
        "retries": 0,
        "results": [(good, True), (other, True), None, (good, False)],
    }
    out = coder._check([data, data, data, data], codec.fingerprint, reply)
    assert out == [(good, True), None, None, (good, False)]
    assert out == coder._check([data] * 4, codec.fingerprint, reply)
    wrong_model = coder._check([data], b"\0" * len(codec.fingerprint), dict(reply, results=[(good, True)]))
    assert wrong_model == [None]
    st = coder.stats()
    assert st["blocks"] == 2 and st["local_fallbacks"] == 5


def test_stat_shows_the_cluster():
    from llmfs.cluster import ClusterStats, WorkerStats
    from llmfs.statcmd import cluster_rows

    st = ClusterStats(
        "ray://head:10001",
        state="ready",
        workers=[
            WorkerStats(
                "w0",
                host="n1",
                pid=7,
                device="cuda",
                blocks=3,
                plain=3 << 16,
                seconds=2.0,
                verified=2,
                failures=1,
            ),
            WorkerStats("w1", host="n2", pid=8, device="cpu", alive=False),
        ],
        batches=1,
        blocks=5,
        plain=5 << 16,
        seconds=4.0,
        retries=1,
        decode_remote_rate=4096.0,
        decode_local_rate=1024.0,
        decode_blocks=4,
        decode_plain=4 << 16,
        decode_seconds=32.0,
        decode_fallbacks=2,
        decode_failures=1,
    )
    rows = dict(cluster_rows(st.as_dict()))
    assert rows["cluster reads"] == (
        "measured 4.0 KiB/s per worker there, 1.0 KiB/s here; decoded 4 blocks, 256.0 KiB at "
        "8.0 KiB/s; 2 decoded here after asking, 1 call(s) failed"
    ), rows["cluster reads"]
    assert dict(cluster_rows(ClusterStats("a").as_dict()))["cluster reads"].startswith("not measured")
    assert "2 worker(s)" in rows["cluster"] and "ready" in rows["cluster"]
    assert "80.0 KiB/s" in rows["cluster compacted"]
    assert "1 worker call(s) failed, 1 retried" in rows["cluster failures"]
    assert "n1 pid 7 cuda: 3 blocks" in rows["cluster worker w0"]
    assert "(lost)" in rows["cluster worker w1"]


class CountingCodec:
    """The daemon's local model for a cold read: the bigram codec, `delay` s slower per decode call
    (a machine slower than the cluster), counting the blocks it decodes."""

    def __init__(self, delay: float = 0.0):
        self.codec = bigram_codec()
        self.fingerprint = self.codec.fingerprint
        self.delay, self.blocks = delay, 0

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def decode_many(self, items):
        self.blocks += len(items)
        time.sleep(self.delay)
        return self.codec.decode_many(items)


def compacted_reader(coder, fs, compactor, delay: float = 0.5):
    """Compact env's tree through the cluster, then a fresh filesystem on the same store with a
    decode cache, the cluster as its remote decoder, and a local model that the start-up
    measurement finds slower than the cluster. Returns (filesystem, local codec)."""
    from llmfs.cache import DecodeCache

    compactor.remote = coder
    assert compactor.compact(compactor.candidates()).lm_blocks == 6
    fs.flush_all()
    local = CountingCodec(delay)
    registry = Registry()
    registry.add_model(local)
    fresh = ns.Filesystem(fs.store, registry, DecodeCache())
    coder.local_decode = registry.decode_many
    coder.calibrate()
    st = coder.stats()
    assert st["decode_remote_rate"] > st["decode_local_rate"] > 0, st
    local.blocks = 0  # the measurement's sample
    fresh.remote = coder
    return fresh, local


def test_cold_reads_decoded_on_the_cluster(shared, env):
    fs, compactor, files, inos = env
    _, coder, _ = shared
    fresh, local = compacted_reader(coder, fs, compactor)
    before = coder.stats()
    for name, data in files.items():
        assert fresh.read_ino(inos[name], len(data) + 1, 0) == data, name
    st = coder.stats()
    assert local.blocks == 0  # every LM block came from the cluster, checked here
    assert st["decode_blocks"] - before["decode_blocks"] == 6
    assert sum(w["decoded"] for w in st["workers"]) >= 6
    # single flight: each LM block once (the raw block of "bin" is read from the map, not cached)
    assert fresh.cache.metrics()["decoded_blocks"] == 6
    for name, data in files.items():  # now cached
        assert fresh.read_ino(inos[name], len(data) + 1, 0) == data, name
    assert coder.stats()["decode_blocks"] == st["decode_blocks"]
    check_fresh(close_env(fs), files, inos)


def test_cluster_stopped_in_the_middle_of_a_read_and_a_compaction(shared, env):
    """The last test of the shared cluster: it stops it. A cold read's decode is on both
    workers (hanging there until the switch goes) and a compaction batch queued behind it when
    the head is stopped: the read decodes here, the compactor encodes here, reads and writes go
    on meanwhile, and every byte is right afterwards."""
    fs, compactor, files, inos = env
    c, coder, switch = shared
    fresh, local = compacted_reader(coder, fs, compactor)
    del compactor._lm_codec().encode  # the daemon may encode now: the cluster goes away
    more = {b"d": TEXT[6 * BS : 8 * BS], b"e": TEXT[8 * BS : 9 * BS]}
    for name, data in more.items():
        inos[name] = write(fs, name, data)
    files.update(more)
    fs.flush_all()
    open(switch + "-decode", "w").close()  # decodes on the workers hang until it is removed
    try:
        out = {}
        reader = threading.Thread(target=lambda: out.update(a=fresh.read_ino(inos[b"a"], 3 * BS, 0)))
        t0 = time.monotonic()
        reader.start()
        time.sleep(0.5)
        comp = threading.Thread(target=lambda: out.update(res=compactor.compact(compactor.candidates())))
        comp.start()
        time.sleep(0.5)
        c.stop()
        # reads and writes go on while the read and the compaction wait for the lost cluster
        t1 = time.monotonic()
        write(fs, b"new", TEXT[:BS])
        assert fs.read_ino(inos[b"d"], 2 * BS, 0) == files[b"d"]
        assert time.monotonic() - t1 < 5.0
        reader.join(60)  # its timeout on the cluster is a few seconds (twice the expected + 5 s)
        assert not reader.is_alive()
        elapsed = time.monotonic() - t0
        comp.join(300)
        assert not comp.is_alive()
    finally:
        os.unlink(switch + "-decode")
    assert out["a"] == files[b"a"]
    assert local.blocks == 3  # decoded here after the cluster went away
    assert out["res"].lm_blocks == 3  # d and e, encoded here
    st = coder.stats()
    assert st["decode_failures"] >= 1 and st["local_fallbacks"] >= 3, st
    # the other files decode here without asking the lost cluster (no wait)
    t1 = time.monotonic()
    assert fresh.read_ino(inos[b"b"], 2 * BS, 0) == files[b"b"]
    assert time.monotonic() - t1 < 5.0
    print(f"read finished {elapsed:.1f} s after it started, the cluster stopped at 1 s")
    files[b"new"] = TEXT[:BS]
    inos[b"new"] = fs.lookup(1, b"new")
    check_fresh(close_env(fs), files, inos)


def test_compact_now_shows_each_workers_progress_within_a_batch(env, monkeypatch):
    """No ray needed: `llmfs compact` on a mount with a cluster gets each worker's bytes while a
    batch is still on the cluster, not only after it."""
    from llmfs import background
    from llmfs.models import Models

    fs, compactor, files, inos = env
    monkeypatch.setattr(background, "PROGRESS_SECONDS", 0.1)

    class SlowCluster(FakeRemote):
        def __init__(self):
            super().__init__(["verified"] * 6)
            self.done = {"w0": 0, "w1": 0}

        def encode_many(self, datas, fingerprint):
            for i in range(4):  # the workers' progress within the batch
                self.done = {"w0": (i + 1) * 100, "w1": i * 100}
                time.sleep(0.3)
            return super().encode_many(datas, fingerprint)

        def progress(self):
            return dict(self.done)

        def start(self):
            pass

        def close(self):
            pass

    cluster = SlowCluster()
    bg = background.Background(fs, Models(fs.store, check=False), None, cluster)
    bg.compactor = compactor
    compactor.remote = cluster
    lines = []
    result = bg._compact({"now": True}, lines.append)
    assert result["lm_blocks"] == 6
    seen = [line["cluster"] for line in lines if line["done"] == 0]  # before the batch returned
    assert {"w0": 300, "w1": 200} in seen or {"w0": 400, "w1": 300} in seen, lines
    assert lines[-1]["done"] == lines[-1]["total"] > 0


def test_reads_ask_the_cluster_only_when_it_is_faster_and_free():
    """No ray needed: the decision of ClusterCoder.decode_many — the start-up measurement, one
    read on the cluster at a time, and local reads for a while after one failed there."""
    from llmfs.cluster import ClusterCoder, WorkerStats

    reg = Registry()
    codec = bigram_codec()
    reg.add_model(codec)
    blob = reg.encode(TEXT[:BS], (LM,), codec.fingerprint)
    coder = ClusterCoder("nowhere:1", "tiny")
    assert coder.decode_many([blob]) is None  # not connected
    coder._conn = object()
    coder._stats.workers = [WorkerStats("w0"), WorkerStats("w1")]
    calls = []

    def remote(blobs, timeout):
        calls.append(timeout)
        return [TEXT[:BS]] * len(blobs)

    coder._decode_remote = remote
    assert coder.decode_many([blob]) is None  # not measured
    coder._stats.decode_local_rate, coder._stats.decode_remote_rate = 1000.0, 600.0
    assert coder.decode_many([blob]) is None and not calls  # one worker is slower than here
    assert coder.decode_many([blob, blob]) == [TEXT[:BS]] * 2  # two are faster
    assert calls == [pytest.approx(2 * BS / 600.0 + 5.0)]  # twice the expected time + slack
    with coder._reading:  # another read is on the cluster
        assert coder.decode_many([blob, blob]) is None
    assert coder.stats()["decode_blocks"] == 2

    def failing(blobs, timeout):
        coder._stats.decode_failures += 1
        return None

    coder._decode_remote = failing
    assert coder.decode_many([blob, blob]) is None
    coder._decode_remote = remote
    assert coder.decode_many([blob, blob]) is None  # reads stay local for `reconnect` seconds
    coder._reads_local_until = 0.0
    assert coder.decode_many([blob, blob]) == [TEXT[:BS]] * 2
