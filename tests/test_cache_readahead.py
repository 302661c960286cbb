"""Readahead (issue 5): the window grows while a file is read sequentially, stops on random reads,
names each block once and stays within the file."""
from __future__ import annotations

from cache import Readahead


def test_sequential_reads_grow_the_window_up_to_the_maximum():
    ra = Readahead(initial=2, maximum=8)
    assert ra.access("f", 0) == [1, 2]
    assert ra.access("f", 1) == [3, 4, 5]           # window 4: up to block 5
    assert ra.access("f", 2) == [6, 7, 8, 9, 10]    # window 8
    assert ra.access("f", 3) == [11]                # capped at 8: names only the new block
    assert ra.access("f", 4) == [12]


def test_a_read_spanning_blocks_and_rereads_inside_a_block():
    ra = Readahead(initial=2, maximum=8)
    assert ra.access("f", 0, 1) == [2, 3]
    assert ra.access("f", 1, 1) == []      # another small read inside block 1: nothing new
    assert ra.access("f", 2, 3) == [4, 5, 6, 7]


def test_random_reads_stop_prefetching_until_reads_are_sequential_again():
    ra = Readahead(initial=2, maximum=8)
    ra.access("f", 0)
    ra.access("f", 1)
    assert ra.access("f", 40) == []
    assert ra.access("f", 7) == []
    assert ra.access("f", 8) == [9, 10]   # sequential again: starts over at the initial window
    assert ra.access("g", 5) == []        # a file first read in the middle: random until proven


def test_the_window_stops_at_the_end_of_the_file():
    ra = Readahead(initial=2, maximum=8)
    assert ra.access("f", 0, nblocks=3) == [1, 2]
    assert ra.access("f", 1, nblocks=3) == []
    assert ra.access("f", 2, nblocks=3) == []


def test_files_are_independent_and_state_is_bounded():
    ra = Readahead(initial=2, maximum=8, max_files=2)
    ra.access("a", 0)
    ra.access("b", 0)
    ra.access("c", 0)                     # forgets "a", the least recently read
    assert ra.access("b", 1) == [3, 4, 5]
    assert ra.access("a", 1) == []        # no state: block 1 is not a sequential start
    ra.forget("b")
    assert ra.access("b", 2) == []
