"""`llmfs mkfs STORE [--block-size N] [--model M]`: create an empty store."""
from __future__ import annotations

import argparse
import os
import sys

from .store import Store, StoreError

# 64 KiB. Measured with `llmfs bench fs --size 16M` on real text (zstd -3 per block, stored/raw):
# 16 KiB 0.293, 64 KiB 0.262, 256 KiB 0.245 (whole-file zstd -3: 0.229), at about the same
# throughput. 256 KiB would save 7 % more, but a 4 KiB random write (sqlite) rewrites a whole
# block and a read of a cold LM block decodes all of it: both scale with the block size.
DEFAULT_BLOCK_SIZE = 64 << 10


# Models known by name (codec/lm): the default, and the tiny random model tests use.
NAMED_MODELS = ("smollm2-135m", "tiny")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def positive_int(text: str) -> int:
    """argparse type of counts such as --threads."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return n


def register(sub) -> None:
    p = sub.add_parser("mkfs", help="create an empty store")
    p.add_argument("store", help="directory to create the store in")
    p.add_argument("--block-size", type=parse_size, default=DEFAULT_BLOCK_SIZE,
                   help="logical block size, a power of two (default 64K)")
    p.add_argument("--model", default="",
                   help="model for compaction: a GGUF file or HF directory (default: SmolLM2-135M)")
    p.set_defaults(func=run)


def run(args) -> int:
    model = args.model
    if model and model not in NAMED_MODELS and not model.startswith("tiny:"):
        if not os.path.exists(model):
            print(f"llmfs mkfs: model {model} does not exist (a GGUF file, a Hugging Face "
                  f"directory, or one of: {', '.join(NAMED_MODELS)})", file=sys.stderr)
            return 1
        model = os.path.abspath(model)
    try:
        Store.create(args.store, args.block_size, model)
    except StoreError as e:
        print(f"llmfs mkfs: {e}", file=sys.stderr)
        return 1
    print(f"created store {args.store} (block size {args.block_size})")
    return 0
