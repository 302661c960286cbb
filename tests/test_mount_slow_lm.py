"""Cold LM reads must not starve everything else: while 16 cold reads of LM blocks wait
for the (one, slow) engine, stat, ls, zstd reads and a 1 MiB write on the same mount each answer
within a second. The daemon is tests/slow_lm_daemon.py: the real mount's FUSE options and
namespace with a fake LM whose decodes wait for a gate file."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from llmfs.codec import Registry

from llmfs import namespace as ns
from llmfs.store import ROOT_INO, Store

from .conftest import ROOT, force_unmount, in_proc_mounts, needs_fuse
from .fake_model import SlowZlibModel, compact_all

pytestmark = [needs_fuse, pytest.mark.mount]

BS = 16384
N_COLD = 16


def _timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def test_metadata_and_writes_answer_while_16_cold_lm_reads_wait(tmp_path):
    store_path, mnt, gate = tmp_path / "store", tmp_path / "mnt", tmp_path / "gate"
    mnt.mkdir()
    Store.create(str(store_path), BS)
    store = Store(str(store_path))
    fs = ns.Filesystem(store, Registry())
    texts = {}
    for i in range(N_COLD):
        texts[b"cold%02d" % i] = (b"cold file %d: some words that compress well. " % i) * 300
    for name, data in texts.items():
        fh = fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
        fs.write(fh, data, 0)
        fs.release(fh)
    compact_all(store, fs.registry, SlowZlibModel())  # every block is LM-coded now
    fh = fs.create(ROOT_INO, b"warm", 0o644, os.O_RDWR, 0, 0)
    fs.write(fh, b"zstd-coded text " * 1000, 0)  # written after: zstd
    fs.release(fh)
    store.close()

    daemon = subprocess.Popen(
        [sys.executable, "-m", "tests.slow_lm_daemon", str(store_path), str(mnt), str(gate)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    results: dict[bytes, bytes | Exception] = {}
    readers = []
    try:
        for _ in range(200):
            if os.path.ismount(mnt):
                break
            time.sleep(0.05)
        assert os.path.ismount(mnt), daemon.stdout.read1().decode() if daemon.poll() else ""

        def read(name: bytes) -> None:
            try:
                results[name] = (mnt / name.decode()).read_bytes()
            except Exception as e:  # reported by the assertion below
                results[name] = e

        readers = [threading.Thread(target=read, args=(n,), daemon=True) for n in texts]
        for r in readers:
            r.start()
        time.sleep(1.0)
        assert not results, "the cold reads should be waiting for the gated engine"

        assert _timed(lambda: os.stat(mnt / "cold00")) < 1.0
        assert _timed(lambda: os.listdir(mnt)) < 1.0
        assert _timed(lambda: (mnt / "warm").read_bytes()) < 1.0
        assert _timed(lambda: (mnt / "new").write_bytes(os.urandom(1 << 20))) < 1.0
        assert _timed(lambda: os.stat(mnt / "new")) < 1.0
        assert not results, "still waiting: the gate is closed"
    finally:
        gate.touch()
        for r in readers:
            r.join(30)
        if in_proc_mounts(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            force_unmount(mnt)
    assert results == texts
    assert daemon.returncode == 0
