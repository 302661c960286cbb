"""codec — how one block of bytes becomes a self-describing, checksummed container and back.

Layers, each depending only on the ones above it:
    container.py  the versioned byte format (header + payload) and its typed errors
    registry.py   permanent one-byte codec ids, the raw and zstd codecs, "smallest wins" encoding,
                  verified decoding
    lm/           the language-model codec: model loading, the exact integer engine, tokenization,
                  arithmetic coding
    tool.py       `llmfs compress` / `llmfs decompress`, the standalone file format
    bench.py      `llmfs bench codec` (compression and speed against xz, zstd, brotli)
    progress.py   the commands' progress bar
The filesystem (llmfs/) uses this package; this package never imports llmfs.
"""

from .container import (
    BadMagic,
    ChecksumMismatch,
    ContainerError,
    Header,
    ModelMismatch,
    Quarantined,
    Truncated,
    UnknownCodec,
    UnsupportedVersion,
)
from .registry import CODEC_NAMES, LM, RAW, ZSTD, Registry

__all__ = [
    "ContainerError",
    "BadMagic",
    "UnsupportedVersion",
    "UnknownCodec",
    "ModelMismatch",
    "ChecksumMismatch",
    "Quarantined",
    "Truncated",
    "Header",
    "Registry",
    "RAW",
    "ZSTD",
    "LM",
    "CODEC_NAMES",
]
