"""Decode cache: get_many decodes each cold block once whoever asks (single flight), batches
a call's misses into one decode, spreads a decode error to every waiter; prefetch decodes in the
background, in batches, after readers; metrics count it all."""

from __future__ import annotations

import threading
import time

import pytest
from llmfs.cache import DecodeCache

TIMEOUT = 10


def key(i) -> bytes:
    return f"k{i}".encode().ljust(32, b"\0")


def plain(k: bytes) -> bytes:
    return k[::-1] * 4


class Engine:
    """A decode callable that records its calls and can be held at the start of a call."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[list[bytes]] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def hold(self) -> None:
        self.gate.clear()

    def __call__(self, keys: list[bytes]) -> list[bytes]:
        with self._lock:
            self.calls.append(list(keys))
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        if self.fail is not None:
            raise self.fail
        return [plain(k) for k in keys]


def wait_until(cond, timeout=TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def run_threads(n, target):
    results, errors = [None] * n, [None] * n

    def body(i):
        try:
            results[i] = target()
        except Exception as e:
            errors[i] = e

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


@pytest.fixture
def cache():
    c = DecodeCache(1 << 20, 0, device=None)
    yield c
    c.close()


def test_get_many_batches_misses_into_one_decode_in_order(cache):
    engine = Engine()
    cache.put(key(1), plain(key(1)))
    keys = [key(3), key(1), key(2), key(3), key(4)]
    assert cache.get_many(keys, engine) == [plain(k) for k in keys]
    assert engine.calls == [[key(3), key(2), key(4)]]
    assert cache.get_many(keys, engine) == [plain(k) for k in keys] and len(engine.calls) == 1
    assert cache.get_many([], engine) == []
    m = cache.metrics()
    assert (m["hits"], m["misses"], m["decodes"], m["decoded_blocks"]) == (5, 3, 1, 3)


def test_threads_asking_for_one_cold_block_share_one_decode(cache):
    engine = Engine()
    engine.hold()
    n = 8
    threads, results, errors = run_threads(n, lambda: cache.get_many([key(7)], engine))
    wait_until(lambda: cache.metrics()["single_flight_waits"] == n - 1)
    engine.gate.set()
    for t in threads:
        t.join(TIMEOUT)
    assert errors == [None] * n and results == [[plain(key(7))]] * n
    assert engine.calls == [[key(7)]]
    assert cache.metrics()["in_flight"] == 0


def test_a_decode_error_reaches_every_waiter_and_nothing_is_cached(cache):
    engine = Engine(fail=OSError("block unreadable"))
    engine.hold()
    n = 5
    threads, results, errors = run_threads(n, lambda: cache.get_many([key(1), key(2)], engine))
    wait_until(lambda: cache.metrics()["single_flight_waits"] == 2 * (n - 1))
    engine.gate.set()
    for t in threads:
        t.join(TIMEOUT)
    assert all(isinstance(e, OSError) and "unreadable" in str(e) for e in errors)
    assert len(engine.calls) == 1
    assert cache.get(key(1)) is None and cache.get(key(2)) is None
    m = cache.metrics()
    assert m["decode_errors"] == 1 and m["in_flight"] == 0
    good = Engine()  # the next reader tries again
    assert cache.get_many([key(1)], good) == [plain(key(1))] and good.calls == [[key(1)]]


def test_a_reader_decodes_only_what_nobody_else_is_decoding(cache):
    slow = Engine()
    slow.hold()
    a = threading.Thread(target=cache.get_many, args=([key(1), key(2)], slow))
    a.start()
    assert slow.entered.wait(TIMEOUT)
    fast = Engine()
    b_out = []
    b = threading.Thread(target=lambda: b_out.append(cache.get_many([key(2), key(3)], fast)))
    b.start()
    wait_until(lambda: fast.calls)
    assert fast.calls == [[key(3)]]  # key 2 is awaited, not decoded again
    slow.gate.set()
    a.join(TIMEOUT)
    b.join(TIMEOUT)
    assert b_out == [[plain(key(2)), plain(key(3))]]


def test_a_decode_returning_the_wrong_number_of_blocks_is_an_error(cache):
    with pytest.raises(ValueError):
        cache.get_many([key(1), key(2)], lambda keys: [b"x"])
    assert cache.get(key(1)) is None and cache.metrics()["in_flight"] == 0


def test_prefetched_keys_are_decoded_in_one_batch_and_counted(cache):
    engine = Engine()
    cache.put(key(0), plain(key(0)))
    cache.prefetch([key(i) for i in range(6)], engine)  # key 0 is cached: skipped
    assert cache.wait_prefetch(TIMEOUT)
    assert engine.calls == [[key(i) for i in range(1, 6)]]
    m = cache.metrics()
    assert (m["prefetched"], m["prefetch_batches"], m["decode_queue"]) == (5, 1, 0)
    hits = m["hits"]
    assert cache.get_many([key(i) for i in range(6)], engine) == [plain(key(i)) for i in range(6)]
    assert len(engine.calls) == 1 and cache.metrics()["hits"] == hits + 6


def test_keys_queued_while_the_worker_is_busy_go_in_one_later_batch(cache):
    engine = Engine()
    engine.hold()
    cache.prefetch([key(1)], engine)
    assert engine.entered.wait(TIMEOUT)
    cache.prefetch([key(2), key(3)], engine)
    cache.prefetch([key(3), key(4), key(1)], engine)  # 3 already queued, 1 in flight
    assert cache.metrics()["decode_queue"] == 3
    engine.gate.set()
    assert cache.wait_prefetch(TIMEOUT)
    assert engine.calls == [[key(1)], [key(2), key(3), key(4)]]


def test_prefetch_batches_are_bounded_and_the_queue_drops_beyond_its_bound():
    cache = DecodeCache(1 << 20, 0, device=None, prefetch_batch=2, prefetch_queue=5)
    engine = Engine()
    engine.hold()
    cache.prefetch([key(0)], engine)
    assert engine.entered.wait(TIMEOUT)
    cache.prefetch([key(i) for i in range(1, 9)], engine)
    assert cache.metrics()["prefetch_dropped"] == 3
    engine.gate.set()
    assert cache.wait_prefetch(TIMEOUT)
    assert engine.calls == [[key(0)], [key(1), key(2)], [key(3), key(4)], [key(5)]]
    cache.close()


def test_prefetch_waits_for_readers_decodes(cache):
    reader = Engine()
    reader.hold()
    t = threading.Thread(target=cache.get_many, args=([key(1)], reader))
    t.start()
    assert reader.entered.wait(TIMEOUT)
    background = Engine()
    cache.prefetch([key(2)], background)
    time.sleep(0.05)
    assert background.calls == []  # low priority: not while a reader decodes
    reader.gate.set()
    t.join(TIMEOUT)
    assert cache.wait_prefetch(TIMEOUT) and background.calls == [[key(2)]]


def test_a_reader_waits_for_a_block_being_prefetched(cache):
    background = Engine()
    background.hold()
    cache.prefetch([key(1)], background)
    assert background.entered.wait(TIMEOUT)
    reader = Engine()
    out = []
    t = threading.Thread(target=lambda: out.append(cache.get_many([key(1)], reader)))
    t.start()
    wait_until(lambda: cache.metrics()["single_flight_waits"] == 1)
    background.gate.set()
    t.join(TIMEOUT)
    assert out == [[plain(key(1))]] and reader.calls == []


def test_a_failed_prefetch_is_counted_and_the_worker_goes_on(cache):
    cache.prefetch([key(1), key(2)], Engine(fail=OSError("corrupt")))
    assert cache.wait_prefetch(TIMEOUT)
    m = cache.metrics()
    assert m["prefetch_errors"] == 2 and m["prefetched"] == 0 and cache.get(key(1)) is None
    engine = Engine()
    cache.prefetch([key(1)], engine)
    assert cache.wait_prefetch(TIMEOUT) and engine.calls == [[key(1)]]


def test_close_stops_the_worker_and_later_prefetches_are_ignored():
    cache = DecodeCache(1 << 20, 0, device=None)
    engine = Engine()
    cache.prefetch([key(1)], engine)
    assert cache.wait_prefetch(TIMEOUT)
    worker = cache._prefetcher._thread
    cache.close()
    assert not worker.is_alive()
    cache.prefetch([key(2)], engine)
    assert engine.calls == [[key(1)]]
    assert cache.get_many([key(2)], engine) == [plain(key(2))]  # reads still work


def test_metrics_names_and_decode_time():
    cache = DecodeCache(1 << 20, 1 << 20, device="cpu")
    cache.get_many([key(1)], lambda keys: (time.sleep(0.01), [plain(k) for k in keys])[1])
    m = cache.metrics()
    for name in (
        "hits",
        "misses",
        "ram_hits",
        "device_hits",
        "ram_bytes",
        "ram_entries",
        "ram_evictions",
        "device_bytes",
        "device_entries",
        "device_evictions",
        "demotions",
        "promotions",
        "decode_queue",
        "decodes",
        "decode_seconds",
        "prefetched",
        "single_flight_waits",
        "in_flight",
        "ghost_entries",
    ):
        assert name in m, name
    assert m["decode_seconds"] >= 0.01 and m["decodes"] == 1 and m["device"] == "cpu"
    cache.close()
