"""The decode cache in a mounted filesystem, through the real default model: a compacted
file read twice decodes once, and opening it decodes its blocks ahead of the reader. Metrics come
from the user.llmfs.cache xattr on the mount root."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Mount, llmfs, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.slow]

GPL = Path("/usr/share/common-licenses/GPL-3").read_bytes()


def metrics(mnt: Path) -> dict:
    out = subprocess.run(
        ["getfattr", "--only-values", "-n", "user.llmfs.cache", str(mnt)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_second_read_does_not_decode_and_open_prefetches(tmp_path):
    m = Mount(tmp_path / "store", tmp_path / "mnt")
    m.mnt.mkdir()
    llmfs("mkfs", m.store, "--block-size", "4K")
    m.mount("--no-compaction")
    try:
        text = GPL[:8192]  # two blocks
        (m.mnt / "f").write_bytes(text)
        assert "2 now stored by the LM" in llmfs("compact", m.mnt, "--now").stdout
        m.remount()  # a fresh daemon: an empty cache
        with open(m.mnt / "f", "rb", buffering=0) as f:
            first = f.read(4096)  # opening queued the file's blocks for the prefetcher
            deadline = time.monotonic() + 300
            while True:  # the prefetcher finishes block 1 while the reader is still on block 0
                before_second = metrics(m.mnt)
                if before_second["in_flight"] == 0 and before_second["decode_queue"] == 0:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.5)
            rest = f.read(8192)
            after_first = metrics(m.mnt)
        assert first + rest == text
        # block 1 was decoded before the reader got there (by our prefetcher or, when the
        # kernel's readahead asked for it with block 0, in the same batch as block 0)
        assert after_first["decoded_blocks"] == before_second["decoded_blocks"] == 2
        assert after_first["misses"] == before_second["misses"]  # block 1 was a hit
        assert (m.mnt / "f").read_bytes() == text
        after_second = metrics(m.mnt)
        # the second read of the file decoded nothing: only cache hits
        assert after_second["decoded_blocks"] == after_first["decoded_blocks"]
        assert after_second["hits"] > after_first["hits"]
        out = llmfs("stat", m.mnt).stdout
        assert "cache hits" in out and "cache decoded_blocks" in out
        m.umount()
    finally:
        if m.mnt.exists() and __import__("os").path.ismount(m.mnt):
            llmfs("umount", m.mnt, check=False)
