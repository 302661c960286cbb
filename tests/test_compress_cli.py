"""`llmfs compress` / `llmfs decompress` end to end, and payloads identical across batch/threads.

Subprocess runs use the built-in "tiny" model (random weights: its chunks end up zstd or raw) to test
the file format, stdin/stdout and error handling; in-process runs swap in a bigram model fitted to the
test text so that chunks really are LM containers; one slow test runs the real default model."""

from __future__ import annotations

import os
import subprocess
import sys

import llmfs.codec.lm as lm_package
import pytest
from llmfs.codec import LM, Registry, tool
from llmfs.codec.lm.codec import LMCodec
from llmfs.codec.lm.tokenizer import ByteTokenizer

from llmfs.cli import main as cli_main
from tests.fake_engine import BigramEngine
from tests.test_lm_codec import TEXT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLMFS = os.path.join(ROOT, ".venv", "bin", "llmfs")
PY = sys.executable


def llmfs(*args, stdin: bytes = b"", check=True) -> subprocess.CompletedProcess:
    cmd = [LLMFS] if os.path.exists(LLMFS) else [PY, "-m", "llmfs.cli"]
    p = subprocess.run(cmd + list(args), input=stdin, capture_output=True, cwd=ROOT, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr.decode()
    return p


@pytest.fixture
def bigram_codec(monkeypatch):
    """Make every spec open a bigram model fitted to TEXT (so LM containers win), fingerprinted by
    the spec so that a different spec is a different model."""
    made = {}

    def fake_open(spec=None, batch=16, threads=None, device="cpu", segment_tokens=64):
        seed = 0 if spec in (None, "bigram") else 1
        c = LMCodec((BigramEngine(seed=seed, train=TEXT), ByteTokenizer()), batch=batch, segment_tokens=64)
        made[spec] = c
        return c

    monkeypatch.setattr(lm_package, "open_codec", fake_open)
    return made


def test_subprocess_round_trip_files_and_pipes(tmp_path):
    data = TEXT * 3 + os.urandom(3000) + b"\x00" * 500 + b"\xff\xfe\r\n"
    src, packed, out = tmp_path / "in", tmp_path / "in.lmfs", tmp_path / "out"
    src.write_bytes(data)
    llmfs("compress", "-m", "tiny", str(src), str(packed))
    assert packed.read_bytes()[:4] == tool.FILE_MAGIC
    llmfs("decompress", str(packed), str(out), "--batch", "3", "--threads", "1")
    assert out.read_bytes() == data
    # stdin -> stdout both ways
    p = llmfs("compress", "-m", "tiny", "-", "-", stdin=data)
    assert p.stdout == packed.read_bytes()  # deterministic
    assert llmfs("decompress", "-", "-", stdin=p.stdout).stdout == data
    assert p.stderr == b""  # no progress bar when stderr is not a terminal


def test_subprocess_errors_are_one_line(tmp_path):
    src, packed, out = tmp_path / "in", tmp_path / "in.lmfs", tmp_path / "out"
    src.write_bytes(TEXT)
    llmfs("compress", "-m", "tiny", str(src), str(packed))
    blob = packed.read_bytes()
    cases = {
        "truncated": blob[:-5],
        "garbage": os.urandom(200),
        "empty": b"",
        "trailing": blob + b"x",
        "flipped": blob[:40] + bytes([blob[40] ^ 1]) + blob[41:],
    }
    for name, bad in cases.items():
        (tmp_path / name).write_bytes(bad)
        p = llmfs("decompress", str(tmp_path / name), str(out), check=False)
        assert p.returncode == 1, name
        err = p.stderr.decode()
        assert err.startswith("llmfs decompress: error: ") and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err
        assert not out.exists(), name  # nothing half-written under OUT's name
    p = llmfs("decompress", str(tmp_path / "missing"), str(out), check=False)
    assert p.returncode == 1 and "No such file" in p.stderr.decode()


def test_in_process_lm_chunks_round_trip(tmp_path, bigram_codec, monkeypatch):
    monkeypatch.setattr(tool, "CHUNK_SIZE", 700)  # several chunks from a small input
    data = TEXT * 4 + b"tail"
    src, packed, out = tmp_path / "in", tmp_path / "in.lmfs", tmp_path / "out"
    src.write_bytes(data)
    assert cli_main(["compress", "-m", "bigram", str(src), str(packed)]) == 0
    assert cli_main(["decompress", str(packed), str(out)]) == 0
    assert out.read_bytes() == data
    # the chunks really are LM containers
    blob = packed.read_bytes()
    first = blob[8 + len(b"bigram") + 4 :]  # file header + spec + first frame length
    assert Registry().header(first).codec_id == LM


def test_in_process_model_mismatch(tmp_path, bigram_codec, capsys):
    src, packed, out = tmp_path / "in", tmp_path / "in.lmfs", tmp_path / "out"
    src.write_bytes(TEXT)
    assert cli_main(["compress", "-m", "bigram", str(src), str(packed)]) == 0
    capsys.readouterr()
    assert cli_main(["decompress", "-m", "other", str(packed), str(out)]) == 1
    err = capsys.readouterr().err
    assert "fingerprint" in err and "'bigram'" in err and err.count("\n") == 1
    assert not out.exists()


PAYLOAD_SCRIPT = """
import hashlib, sys, torch
from llmfs.codec.lm import open_codec
threads, batch = int(sys.argv[1]), int(sys.argv[2])
c = open_codec("tiny", batch=batch, threads=threads, segment_tokens=48)
data = open(sys.argv[3], "rb").read()
p = c.encode_payload(data)
open(sys.argv[4], "wb").write(p)
if len(sys.argv) > 5:  # also decode another run's payload
    other = open(sys.argv[5], "rb").read()
    assert c.decode_many([(other, len(data))]) == [data], "decode mismatch"
# a fused CPU engine runs its own threads (torch keeps one); other engines use torch's
print(getattr(c.engine, "threads", None) if getattr(c.engine, "fused", False)
      else torch.get_num_threads(), hashlib.sha256(p).hexdigest())
"""


def test_payload_identical_across_batch_and_threads(tmp_path):
    """Encoded with --batch 1 --threads 1 and with --batch 16 --threads 2 (separate processes, so
    the engine really uses those thread counts): same bytes, and each decodes the other's
    payload."""
    data = TEXT[:200] + bytes(range(0, 256, 3))  # 5 segments of <= 47 tokens
    (tmp_path / "data").write_bytes(data)
    a, b = tmp_path / "a", tmp_path / "b"
    run = lambda *args: subprocess.run(
        [PY, "-c", PAYLOAD_SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, timeout=300, text=True
    )
    pa = run(1, 1, tmp_path / "data", a)
    assert pa.returncode == 0, pa.stderr
    pb = run(2, 16, tmp_path / "data", b, a)
    assert pb.returncode == 0, pb.stderr
    pa2 = run(1, 1, tmp_path / "data", a, b)
    assert pa2.returncode == 0, pa2.stderr
    assert pa.stdout.split()[0] == "1" and pb.stdout.split()[0] == "2"
    assert pa.stdout.split()[1] == pb.stdout.split()[1]
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.slow
def test_real_default_model_through_the_cli(tmp_path):
    text = (
        b"This program is free software: you can redistribute it and/or modify it under the "
        b"terms of the GNU General Public License as published by the Free Software "
        b"Foundation, either version 3 of the License.\n"
    )
    src, packed, _out = tmp_path / "in", tmp_path / "in.lmfs", tmp_path / "out"
    src.write_bytes(text)
    llmfs("compress", str(src), str(packed), "--batch", "1", "--threads", "1")
    blob = packed.read_bytes()
    spec_len = int.from_bytes(blob[6:8], "big")
    first = blob[8 + spec_len + 4 :]
    assert Registry().header(first).codec_id == LM  # the model, not zstd, won
    p = llmfs("decompress", str(packed), "-", "--batch", "16", "--threads", "2")
    assert p.stdout == text
