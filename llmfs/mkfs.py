"""`llmfs mkfs STORE [--block-size N] [--model M]`: create an empty store."""

from __future__ import annotations

import os
import sys

from llmfs.codec.lm import DEFAULT_MODEL, TINY_SPEC

from .store import Store, StoreError
from .units import parse_size

# 64 KiB. Larger blocks compress text a little better with zstd (docs/benchmarks.md, "Filesystem
# throughput"), but a 4 KiB random write (sqlite) rewrites a whole block and a read of a cold LM
# block decodes all of it: both scale with the block size.
DEFAULT_BLOCK_SIZE = 64 << 10


# Models known by name (codec/lm): the default, and the tiny random model tests use.
NAMED_MODELS = (DEFAULT_MODEL, TINY_SPEC)


def register(sub) -> None:
    p = sub.add_parser("mkfs", help="create an empty store")
    p.add_argument("store", help="directory to create the store in")
    p.add_argument(
        "--block-size",
        type=parse_size,
        default=DEFAULT_BLOCK_SIZE,
        help="logical block size, a power of two (default 64K)",
    )
    p.add_argument(
        "--model",
        default="",
        help="model for compaction: a GGUF file or HF directory (default: SmolLM2-135M)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    model = args.model
    if model and model not in NAMED_MODELS and not model.startswith(TINY_SPEC + ":"):
        if not os.path.exists(model):
            print(
                f"llmfs mkfs: model {model} does not exist (a GGUF file, a Hugging Face "
                f"directory, or one of: {', '.join(NAMED_MODELS)})",
                file=sys.stderr,
            )
            return 1
        model = os.path.abspath(model)
    try:
        Store.create(args.store, args.block_size, model)
    except StoreError as e:
        print(f"llmfs mkfs: {e}", file=sys.stderr)
        return 1
    print(f"created store {args.store} (block size {args.block_size})")
    return 0
