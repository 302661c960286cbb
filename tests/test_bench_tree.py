"""`llmfs bench fs`'s source tree for `tar x`: its bounds (files, bytes, largest file)."""

from __future__ import annotations

import tarfile

from llmfs.bench import source_tar


def test_source_tar_keeps_its_bounds(tmp_path):
    dst = tmp_path / "t.tar"
    n, size = source_tar(dst, files=300, limit=2 << 20, largest=16 << 10)
    with tarfile.open(dst) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    assert len(members) == n and 0 < n <= 300
    assert sum(m.size for m in members) == size <= 2 << 20
    assert max(m.size for m in members) <= 16 << 10
    assert len({m.name for m in members}) == n
