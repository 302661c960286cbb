"""The `llmfs` command line as a user's shell runs it: a reader that closes the pipe early
(`llmfs stat | head`) ends the command quietly, without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

LLMFS = [sys.executable, "-m", "llmfs.cli"]


def closed_pipe(args: list[str]) -> subprocess.CompletedProcess:
    """Run the command with its stdout a pipe whose reader is already gone."""
    p = subprocess.Popen(LLMFS + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    return subprocess.CompletedProcess(args, p.returncode, "", err)


@pytest.mark.parametrize("args", [["--help"], ["stat", "{store}"], ["fsck", "--quick", "{store}"]])
def test_closed_pipe_is_quiet(tmp_path, args):
    store = tmp_path / "s"
    subprocess.run(LLMFS + ["mkfs", str(store)], check=True, capture_output=True)
    res = closed_pipe([a.format(store=store) for a in args])
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode in (0, 141), (res.returncode, res.stderr)


def test_bench_codec_names_a_file_it_cannot_read(tmp_path):
    """A wrong file name is an error in words, before the model loads, not a traceback."""
    res = subprocess.run(
        LLMFS + ["bench", "codec", str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "cannot read" in res.stderr and "missing.txt" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("bench", ["fs", "compaction", "cache"])
def test_bench_names_a_dir_it_cannot_use(tmp_path, bench):
    """`--dir` that does not exist: an error in words (rc 2) before anything is mounted."""
    where = tmp_path / "no" / "such"
    res = subprocess.run(
        LLMFS + ["bench", bench, "--dir", str(where)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res.stderr
    assert f"cannot make a directory in {where}" in res.stderr and "Traceback" not in res.stderr
