"""Decode cache: 2Q keeps a hot set through a scan, budgets hold, blocks move between the RAM
and device tiers (CPU tensors here, CUDA in production), and resize() releases memory."""

from __future__ import annotations

import gc
import subprocess
import sys
import tracemalloc
import weakref
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from llmfs.cache import DecodeCache
from llmfs.cache.tiers import RAM_ENTRY_OVERHEAD, device_charge, ram_charge

BLOCK = 4096
SLOT = ram_charge(BLOCK)  # what one block costs the RAM budget


def key(name: str, i: int) -> bytes:
    return f"{name}{i}".encode().ljust(32, b"\0")


def data_of(k: bytes, size: int = BLOCK) -> bytes:
    return (k * (size // len(k) + 1))[:size]


def read(cache, k: bytes, size: int = BLOCK) -> bool:
    """Read as the filesystem does: get, and on a miss decode (here: make) and put. True on a hit."""
    got = cache.get(k)
    if got is not None:
        assert got == data_of(k, size)
        return True
    cache.put(k, data_of(k, size))
    return False


def test_hot_set_survives_a_scan_larger_than_the_budget():
    cache = DecodeCache(64 * SLOT, 0, device=None)
    hot = [key("h", i) for i in range(16)]
    for _ in range(4):  # a hot set read repeatedly while other blocks come and go
        for i, k in enumerate(hot):
            read(cache, k)
            read(cache, key("w", i + _ * 100))
    assert cache.metrics()["protected_entries"] == 16
    for i in range(1000):  # one `tar` of 1000 blocks, each read 3 times in a row, budget 64
        for _ in range(3):
            read(cache, key("s", i))
    assert all(read(cache, k) for k in hot)
    m = cache.metrics()
    assert m["protected_entries"] == 16 and m["ram_bytes"] <= m["ram_budget"]


def test_scan_blocks_never_reach_the_device_tier():
    cache = DecodeCache(16 * SLOT, 64 * device_charge(BLOCK), device="cpu")
    for i in range(500):
        for _ in range(2):
            read(cache, key("s", i))
    m = cache.metrics()
    assert m["device_entries"] == 0 and m["protected_entries"] == 0 and m["demotions"] == 0


def test_protected_blocks_demote_to_device_and_promote_back_on_a_hit():
    # Ghosts remember half of RAM + device: 10 blocks.
    cache = DecodeCache(4 * SLOT, 16 * device_charge(BLOCK), device="cpu")
    hot = [key("h", i) for i in range(8)]
    for k in hot:  # first read: probation; pushed out by fillers, remembered as ghosts
        read(cache, k)
    for i in range(4):
        read(cache, key("f", i))
    for k in hot:  # second read: a ghost hit, so protected; the fillers leave probation down to its
        assert not read(cache, k)  # share (1 block), RAM keeps 3 protected, the other 5 are demoted
    m = cache.metrics()
    assert (m["probation_entries"], m["protected_entries"], m["device_entries"]) == (1, 3, 5)
    assert m["demotions"] == 5
    assert m["ram_bytes"] <= m["ram_budget"] and m["device_bytes"] <= m["device_budget"]
    tensors = list(cache._device._data.values())
    assert all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.device.type == "cpu" for t in tensors
    )
    on_device = [k for k in hot if k in cache._device]
    assert read(cache, on_device[0])  # a device hit: right bytes, back in RAM
    assert on_device[0] in cache._ram and on_device[0] not in cache._device
    m = cache.metrics()
    assert m["device_hits"] == 1 and m["promotions"] == 1
    assert all(read(cache, k) for k in hot)  # nothing was lost in the exchanges
    assert len(cache) == 9  # the 8 hot blocks and the filler left in probation


@settings(max_examples=60, deadline=None)
@given(
    ram_slots=st.integers(0, 6),
    dev_slots=st.integers(0, 6),
    ops=st.lists(st.tuples(st.integers(0, 12), st.sampled_from([0, 1, 100, 3000, 9000])), max_size=80),
    resize_at=st.integers(0, 80),
    new_slots=st.tuples(st.integers(0, 6), st.integers(0, 6)),
)
def test_budgets_are_never_exceeded_and_reads_are_exact(ram_slots, dev_slots, ops, resize_at, new_slots):
    cache = DecodeCache(ram_slots * SLOT, dev_slots * device_charge(BLOCK), device="cpu")
    for n, (i, size) in enumerate(ops):
        if n == resize_at:
            cache.resize(ram_budget=new_slots[0] * SLOT, device_budget=new_slots[1] * device_charge(BLOCK))
        k = key(f"k{size}_", i)  # content-addressed: the key determines the bytes
        read(cache, k, size)
        m = cache.metrics()
        assert m["ram_bytes"] <= m["ram_budget"] and m["device_bytes"] <= m["device_budget"]
        p = cache._policy
        assert cache._ram.bytes == p.ram_bytes and cache._device.bytes == p.device_bytes
        assert len(cache._ram) == len(p.probation) + len(p.protected)
        assert len(cache._device) == len(p.demoted)
        assert p.ghost_bytes <= p.ghost_budget


def test_a_block_larger_than_ram_is_not_cached():
    cache = DecodeCache(BLOCK, 0, device=None)
    cache.put(key("big", 0), bytes(BLOCK))  # plus RAM_ENTRY_OVERHEAD: does not fit
    assert cache.get(key("big", 0)) is None and cache.metrics()["ram_bytes"] == 0
    cache.put(key("fit", 0), bytes(BLOCK - RAM_ENTRY_OVERHEAD))
    assert cache.get(key("fit", 0)) is not None


def test_resize_releases_ram():
    cache = DecodeCache(64 * (1 << 16), 0, device=None)
    tracemalloc.start()
    try:
        for i in range(32):
            cache.put(key("r", i), bytes([i]) * (1 << 16))  # 2 MiB, referenced only by the cache
        held = tracemalloc.get_traced_memory()[0]
        cache.resize(ram_budget=4 * ram_charge(1 << 16))
        released = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert released >= 28 << 16
    m = cache.metrics()
    assert m["ram_entries"] == 4 and m["ram_bytes"] <= m["ram_budget"]
    cache.clear()
    assert len(cache) == 0 and cache.size == 0
    cache.put(key("r", 0), bytes(1 << 16))  # the budget stayed
    assert cache.get(key("r", 0)) is not None


def test_resize_frees_device_tensors():
    cache = DecodeCache(2 * SLOT, 16 * device_charge(BLOCK), device="cpu")
    hot = [key("h", i) for i in range(6)]
    for k in hot:
        read(cache, k)
    for i in range(2):
        read(cache, key("f", i))
    for k in hot:
        read(cache, k)
    refs = [weakref.ref(t) for t in cache._device._data.values()]
    assert len(refs) >= 3
    cache.resize(device_budget=0)
    gc.collect()
    assert all(r() is None for r in refs)
    assert cache.metrics()["device_entries"] == 0 and cache.metrics()["device_bytes"] == 0


def test_get_put_interface():
    cache = DecodeCache(1 << 20, 0, device=None)
    assert cache.get(key("a", 0)) is None
    cache.put(key("a", 0), b"plain")
    assert cache.get(key("a", 0)) == b"plain"
    cache.put(key("b", 0), bytearray(b"copied"))
    assert cache.get(key("b", 0)) == b"copied"
    assert len(cache) == 2 and cache.size == 2 * RAM_ENTRY_OVERHEAD + 11
    m = cache.metrics()
    assert (m["hits"], m["misses"]) == (2, 1)


def test_without_cuda_and_without_device_the_device_tier_is_off():
    if torch.cuda.is_available():
        return
    cache = DecodeCache(1 << 20, 1 << 20)
    assert cache.metrics()["device_budget"] == 0 and cache.metrics()["device"] is None


def test_a_cache_without_device_tier_does_not_import_torch():
    # torch costs ~1.8 s of start-up to every llmfs command that imports the cache.
    code = (
        "import sys, llmfs.cache as cache; c = cache.DecodeCache(1 << 20); c.put(b'k' * 32, b'x'); "
        "c.get_many([b'j' * 32], lambda ks: [b'y' for k in ks]); c.metrics(); c.resize(0); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
