"""The daemon's control socket (llmfs/control.py) on its own: request and answer lines, progress,
errors, the socket's mode, store paths longer than a socket address, and a slow request that does
not hold up another."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from llmfs import control


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(handlers, path=tmp_path):
        path.mkdir(parents=True, exist_ok=True)
        servers.append(control.ControlServer(str(path), handlers))
        return str(path)

    yield start
    for s in servers:
        s.close()


def test_progress_lines_then_the_result(serve):
    def count(req, send):
        for i in range(req["n"]):
            send({"done": i + 1, "total": req["n"]})
        return {"counted": req["n"]}

    path = serve({"count": count})
    answers = list(control.request(path, {"op": "count", "n": 3}))
    assert answers == [
        {"done": 1, "total": 3},
        {"done": 2, "total": 3},
        {"done": 3, "total": 3},
        {"result": {"counted": 3}},
    ]


def test_unknown_requests_and_failing_handlers_answer_an_error(serve):
    def fail(req, send):
        raise RuntimeError("the store is gone")

    path = serve({"fail": fail})
    assert list(control.request(path, {"op": "nope"})) == [{"error": "unknown request 'nope'"}]
    assert list(control.request(path, {"op": "fail"})) == [{"error": "the store is gone"}]


def test_the_socket_is_the_owners_only_and_goes_away_on_close(tmp_path):
    server = control.ControlServer(str(tmp_path), {})
    sock = tmp_path / control.SOCKET_NAME
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    server.close()
    assert not sock.exists()
    with pytest.raises(OSError):  # nobody answers any more
        list(control.request(str(tmp_path), {"op": "stats"}))


def test_a_store_path_longer_than_a_socket_address_works(serve, tmp_path):
    deep = tmp_path.joinpath(*["d" * 40] * 4)  # well over sun_path's 108 bytes
    assert len(str(deep / control.SOCKET_NAME)) > 108
    path = serve({"stats": lambda req, send: {"ok": True}}, deep)
    assert list(control.request(path, {"op": "stats"})) == [{"result": {"ok": True}}]


def test_a_slow_request_does_not_block_another(serve):
    release = threading.Event()

    def slow(req, send):
        send({"started": True})
        assert release.wait(10)
        return {"slow": "done"}

    path = serve({"slow": slow, "stats": lambda req, send: {"fast": True}})
    answers = control.request(path, {"op": "slow"})
    assert next(answers) == {"started": True}  # the slow handler is now running
    assert list(control.request(path, {"op": "stats"})) == [{"result": {"fast": True}}]
    release.set()
    assert list(answers) == [{"result": {"slow": "done"}}]


def test_a_restarted_daemon_replaces_a_stale_socket(tmp_path):
    first = control.ControlServer(str(tmp_path), {})
    first._sock.close()  # a daemon that died without cleaning up leaves its socket file behind
    assert (tmp_path / control.SOCKET_NAME).exists()
    second = control.ControlServer(str(tmp_path), {"stats": lambda req, send: {"n": 2}})
    try:
        assert list(control.request(str(tmp_path), {"op": "stats"})) == [{"result": {"n": 2}}]
    finally:
        second.close()
        os.close(first._dir_fd)
