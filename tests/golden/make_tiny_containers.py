# Writes tiny-model LM containers in `llmfs compress`'s file format with the code of main at 2fa6d7d
# (`llmfs compress -m tiny` would keep zstd: the random tiny model compresses nothing).
import sys

from llmfs.codec import container
from llmfs.codec.lm import open_codec
from llmfs.codec.registry import LM
from llmfs.codec.tool import _FRAME, _HEAD, _TRAILER, FILE_MAGIC, FILE_VERSION

codec = open_codec("tiny")
for name in sys.argv[1:]:
    data = open(name, "rb").read()
    blob = container.pack(
        LM, len(data), container.checksum(data), codec.encode_payload(data), codec.fingerprint
    )
    with open(f"out/tiny_{name}.llmz", "wb") as f:
        f.write(
            _HEAD.pack(FILE_MAGIC, FILE_VERSION, 0, 4)
            + b"tiny"
            + _FRAME.pack(len(blob))
            + blob
            + _FRAME.pack(0)
            + _TRAILER.pack(len(data), 1)
        )
