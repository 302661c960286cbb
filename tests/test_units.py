"""Sizes and counts as people write them (llmfs/units.py). The mount table: tests/test_mounts.py."""

from __future__ import annotations

import argparse

import pytest

from llmfs.units import human, parse_size, positive_int


@pytest.mark.parametrize(
    "text,n",
    [
        ("4096", 4096),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("64KiB", 64 << 10),
        ("64kb", 64 << 10),
        (" 2G ", 2 << 30),
        ("1M", 1 << 20),
        ("0", 0),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "K", "lots", "1.5M", "64T"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_positive_int():
    assert positive_int("3") == 3
    for bad in ("0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)


def test_human():
    assert [human(n) for n in (0, 1023, 1024, 1536, 64 << 20, 3 << 40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "64.0 MiB",
        "3.0 TiB",
    ]
