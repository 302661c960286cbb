"""Sizes and counts as people write them: command-line arguments (`--block-size 64K`,
`--threads 2`), config-file values (`ram = "64M"`) and the sizes commands print."""

from __future__ import annotations

import argparse

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from "4096", "64K", "64k", "64KiB", "2G" (binary units; ValueError otherwise)."""
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in _UNITS:
        return int(text[:-1]) * _UNITS[text[-1]]
    return int(text)


def positive_int(text: str) -> int:
    """argparse type of counts such as --threads."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return n


def human(n: float) -> str:
    """A byte count for people: "512 B", "1.5 KiB", "64.0 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
