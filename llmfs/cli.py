"""`llmfs` command line: one subcommand per module; each module has `register(subparsers)`, which adds
its parser and sets `func` to a `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import service

# Modules that provide subcommands, in the order `llmfs --help` lists them.
COMMAND_MODULES = [
    "llmfs.mkfs",
    "llmfs.mount",
    "llmfs.umount",
    "llmfs.statcmd",
    "llmfs.fsck",
    "llmfs.compact",
    "llmfs.tune",
    "llmfs.codec.tool",
    "llmfs.codec.bench",
    "llmfs.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmfs", description="A filesystem that stores files compressed by a language model."
    )
    parser.add_argument("--debug", action="store_true", help="verbose logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        service.setup_logging(logging.DEBUG if args.debug else logging.INFO)
        rc = args.func(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return rc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `llmfs stat | head`: the reader is gone. Quiet, like coreutils; later flushes of
        # stdout go to /dev/null so the interpreter's exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
