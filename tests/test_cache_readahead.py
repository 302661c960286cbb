"""Readahead: the window grows while a file is read sequentially, stops on random reads,
names each block once and stays within the file."""

from __future__ import annotations

from llmfs.cache import Readahead


def test_sequential_reads_grow_the_window_up_to_the_maximum():
    ra = Readahead(initial=2, maximum=8)
    assert ra.access("f", 0) == [1, 2]
    assert ra.access("f", 1) == [3, 4, 5]  # window 4: up to block 5
    assert ra.access("f", 2) == [6, 7, 8, 9, 10]  # window 8
    assert ra.access("f", 3) == [11]  # capped at 8: names only the new block
    assert ra.access("f", 4) == [12]


def test_a_read_spanning_blocks_and_rereads_inside_a_block():
    ra = Readahead(initial=2, maximum=8)
    assert ra.access("f", 0, 1) == [2, 3]
    assert ra.access("f", 1, 1) == []  # another small read inside block 1: nothing new
    assert ra.access("f", 2, 3) == [4, 5, 6, 7]


def test_random_reads_stop_prefetching_until_reads_are_sequential_again():
    ra = Readahead(initial=2, maximum=8)
    ra.access("f", 0)
    ra.access("f", 1)
    assert ra.access("f", 40) == []
    assert ra.access("f", 7) == []
    assert ra.access("f", 8) == [9, 10]  # sequential again: starts over at the initial window
    assert ra.access("g", 5) == []  # a file first read in the middle: random until proven


def test_the_window_stops_at_the_end_of_the_file():
    ra = Readahead(initial=2, maximum=8)
    assert ra.access("f", 0, nblocks=3) == [1, 2]
    assert ra.access("f", 1, nblocks=3) == []
    assert ra.access("f", 2, nblocks=3) == []


def test_files_are_independent_and_state_is_bounded():
    ra = Readahead(initial=2, maximum=8, max_files=2)
    ra.access("a", 0)
    ra.access("b", 0)
    ra.access("c", 0)  # forgets "a", the least recently read
    assert ra.access("b", 1) == [3, 4, 5]
    assert ra.access("a", 1) == []  # no state: block 1 is not a sequential start
    ra.forget("b")
    assert ra.access("b", 2) == []


def test_directory_walk_in_name_order():
    """Opening the directory's next file after the one opened last starts a walk; the next files
    are named again when the walk reaches the middle of the last window; any other open ends it."""
    files = [b"a", b"b", b"c", b"d", b"e", b"f", b"g"]

    def next_file(name):
        later = [f for f in files if f > name]
        return later[0] if later else None

    ra = Readahead()
    assert ra.open_in_dir(7, b"a", next_file) is None  # one open is not a walk
    assert ra.open_in_dir(7, b"b", next_file) == b"b"  # the next one: list after b
    ra.named_files(7, [b"c", b"d", b"e", b"f"])
    assert ra.open_in_dir(7, b"c", next_file) is None  # still inside the first half
    assert ra.open_in_dir(7, b"d", next_file) is None
    assert ra.open_in_dir(7, b"e", next_file) == b"f"  # the middle: list after what was named
    ra.named_files(7, [b"g"])
    assert ra.open_in_dir(7, b"f", next_file) is None
    assert ra.open_in_dir(7, b"g", next_file) == b"g"
    ra.named_files(7, [])  # the end of the directory
    assert ra.open_in_dir(7, b"a", next_file) is None  # out of order: the walk ends ...
    assert ra.open_in_dir(7, b"c", next_file) is None  # ... skipping ahead is no walk ...
    assert ra.open_in_dir(7, b"d", next_file) == b"d"  # ... the next file starts one again
    assert ra.open_in_dir(8, b"z", next_file) is None  # directories are independent


def test_directory_walks_are_bounded():
    ra = Readahead(max_files=2)
    for d in range(5):
        ra.open_in_dir(d, b"a", lambda name: None)
    assert len(ra._walks) == 2
