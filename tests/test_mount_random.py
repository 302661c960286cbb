"""A seeded random sequence of file operations applied to the mount and to a plain directory in
lockstep; every read and the final trees must agree."""

from __future__ import annotations

import os
import random

import pytest

from .conftest import needs_fuse
from .treeutil import digest

pytestmark = [needs_fuse, pytest.mark.mount]

N_OPS = 4000
BLOCK = 64 << 10


def _data(rng: random.Random, n: int) -> bytes:
    kind = rng.random()
    if kind < 0.3:
        return bytes(n)  # zeros: holes and zero-block dedup
    if kind < 0.6:
        return (b"the quick brown fox %d " % rng.randrange(1000) * (n // 20 + 1))[:n]
    return rng.randbytes(n)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_match_plain_directory(mounted, tmp_path, seed):
    rng = random.Random(seed)
    roots = [mounted.mnt, tmp_path / "plain"]
    roots[1].mkdir()
    names = [f"f{i}" for i in range(8)]
    fds: list[tuple[int, int]] = []  # open (mount fd, plain fd) pairs, some of unlinked files
    for step in range(N_OPS):
        op = rng.random()
        name = rng.choice(names)
        paths = [r / name for r in roots]
        exists = paths[1].exists()
        if op < 0.35 and (exists or rng.random() < 0.5):
            off = rng.choice(
                [0, rng.randrange(4 * BLOCK), rng.randrange(BLOCK - 100, BLOCK + 100), rng.randrange(1 << 20)]
            )
            data = _data(rng, rng.choice([1, 100, 4096, BLOCK, BLOCK + 7, 3 * BLOCK]))
            for p in paths:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
                assert os.pwrite(fd, data, off) == len(data)
                os.close(fd)
        elif op < 0.45 and exists:
            size = rng.choice([0, rng.randrange(3 * BLOCK), rng.randrange(1 << 20)])
            for p in paths:
                os.truncate(p, size)
        elif op < 0.55 and exists:
            dst = rng.choice(names)
            for r in roots:
                os.rename(r / name, r / dst)
        elif op < 0.62 and exists:
            if rng.random() < 0.5:  # unlink while open: the data must live until the last close
                fds.append(tuple(os.open(p, os.O_RDWR) for p in paths))
            for p in paths:
                os.unlink(p)
        elif op < 0.72 and fds:
            pair = rng.choice(fds)
            off, data = rng.randrange(2 * BLOCK), _data(rng, rng.randrange(1, 3 * BLOCK))
            for fd in pair:
                os.pwrite(fd, data, off)
            got = [os.pread(fd, 4 * BLOCK, 0) for fd in pair]
            assert got[0] == got[1], f"step {step}: open unlinked file differs"
            if rng.random() < 0.3:
                fds.remove(pair)
                for fd in pair:
                    os.close(fd)
        elif op < 0.8 and exists:
            fd_pair = [os.open(p, os.O_WRONLY | os.O_APPEND) for p in paths]
            data = _data(rng, rng.randrange(1, 5000))
            for fd in fd_pair:
                os.write(fd, data)
                os.close(fd)
        elif exists:
            off, n = rng.randrange(1 << 20), rng.randrange(1, 3 * BLOCK)
            got = []
            for p in paths:
                with open(p, "rb") as f:
                    f.seek(off)
                    got.append(f.read(n))
            assert got[0] == got[1], f"step {step}: read of {name} at {off}+{n} differs"
            assert os.stat(paths[0]).st_size == os.stat(paths[1]).st_size
    for pair in fds:
        for fd in pair:
            os.close(fd)
    assert digest(roots[0]) == digest(roots[1])
    mounted.remount()
    assert digest(roots[0]) == digest(roots[1])
