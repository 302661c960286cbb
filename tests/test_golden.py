"""Golden LM containers: files written by earlier releases, on other machines, decode bit
for bit with this one. tests/golden (this repository: tiny and default model, five texts) and
../shared/golden (beside the repository: default model, written on an AMD EPYC with AVX2 and no
AVX-512 from main at 16af6cc) hold `llmfs compress` files and the plaintexts' sha256. They are data:
never regenerate them; a new engine version adds its own."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from llmfs.codec import Registry
from llmfs.codec.container import ModelMismatch
from llmfs.codec.lm import open_codec
from llmfs.codec.tool import _FRAME, _HEAD, FILE_MAGIC

HERE = Path(__file__).resolve().parent / "golden"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "golden"


def sums(folder: Path) -> dict[str, str]:
    out = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        out[name] = digest
    return out


def containers(path: Path) -> tuple[str, list[bytes]]:
    """(model spec, containers) of an `llmfs compress` file."""
    buf = path.read_bytes()
    magic, _version, _flags, n = _HEAD.unpack_from(buf, 0)
    assert magic == FILE_MAGIC
    spec = buf[_HEAD.size : _HEAD.size + n].decode()
    pos, out = _HEAD.size + n, []
    while True:
        (size,) = _FRAME.unpack_from(buf, pos)
        pos += _FRAME.size
        if size == 0:
            return spec, out
        out.append(buf[pos : pos + size])
        pos += size


def decode_all(files: list[tuple[Path, str]], spec: str) -> None:
    """Decode every file's containers with one codec of `spec` (one batch) and check the hashes."""
    torch.set_num_threads(1)
    codec = open_codec(spec)

    def resolve(fp: bytes):
        if fp not in codec.fingerprints:
            raise ModelMismatch(f"{fp.hex()} is not a fingerprint of {spec}")
        return codec

    registry = Registry(model_resolver=resolve)
    blobs, owners = [], []
    for path, _digest in files:
        file_spec, cs = containers(path)
        assert file_spec == spec
        blobs += cs
        owners += [path] * len(cs)
    plain = registry.decode_many(blobs)
    for path, digest in files:
        data = b"".join(p for p, o in zip(plain, owners) if o == path)
        assert hashlib.sha256(data).hexdigest() == digest, path.name


def golden(folder: Path, prefix: str = "") -> list[tuple[Path, str]]:
    return [
        (folder / f"{prefix}{name}.llmz", digest)
        for name, digest in sums(folder).items()
        if (folder / f"{prefix}{name}.llmz").exists()
    ]


def test_tiny_model_goldens_decode():
    files = golden(HERE, "tiny_")
    assert len(files) == 5
    decode_all(files, "tiny")


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LLMFS_CACHE", str(tmp_path_factory.mktemp("models")))
    yield
    mp.undo()


@pytest.mark.slow
def test_default_model_goldens_decode(isolated_cache):
    files = golden(HERE)
    assert len(files) == 5
    if SHARED.is_dir():
        shared = golden(SHARED)
        assert len(shared) == 4
        files += shared
    decode_all(files, "smollm2-135m")
    if not SHARED.is_dir():
        pytest.skip(
            f"{SHARED} is absent (CI clones shared/ beside the repository): only tests/golden was decoded"
        )


def test_golden_files_are_unchanged():
    """The containers themselves are pinned (the README: never regenerated)."""
    pinned = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(HERE.glob("*.llmz"))}
    assert pinned == GOLDEN_FILES


GOLDEN_FILES = {
    "code_py.txt.llmz": "89e3af2840dd77a2",
    "prose_ar.txt.llmz": "cf5f64b2fc4f9187",
    "prose_en.txt.llmz": "273c93d9a2fd8d9f",
    "prose_ru.txt.llmz": "a0a675f3a9a9ce29",
    "prose_zh.md.llmz": "1b3b480b5cce5d07",
    "tiny_code_py.txt.llmz": "f58391e681231c5e",
    "tiny_prose_ar.txt.llmz": "0865cf57d6671508",
    "tiny_prose_en.txt.llmz": "e2553277204e3862",
    "tiny_prose_ru.txt.llmz": "be333f9fae2559db",
    "tiny_prose_zh.md.llmz": "ae95bf646ea240d4",
}
