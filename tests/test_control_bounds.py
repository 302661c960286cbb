"""The daemon's control socket bounds what a client can make it hold: the length of a
request line, the connections served at once, and how long a silent client keeps its slot."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from llmfs import control


@pytest.fixture
def server(tmp_path):
    release = threading.Event()
    started = []

    def slow(req, send):
        started.append(req.get("n"))
        send({"done": 0, "total": 1})
        release.wait(10)
        return {"n": req.get("n")}

    srv = control.ControlServer(
        str(tmp_path),
        {"stats": lambda req, send: {"ok": True}, "slow": slow},
        max_clients=2,
        max_request=1024,
        io_timeout=0.5,
    )
    srv.release, srv.started, srv.path = release, started, str(tmp_path)
    yield srv
    release.set()
    srv.close()


def raw(path: str, payload: bytes) -> list[dict]:
    """Send raw bytes, read every answer line until the daemon closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(f"{path}/{control.SOCKET_NAME}")
        s.settimeout(5)
        s.sendall(payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_an_ordinary_request(server):
    assert list(control.request(server.path, {"op": "stats"})) == [{"result": {"ok": True}}]


def test_a_request_line_longer_than_the_limit_is_refused(server):
    answers = raw(server.path, json.dumps({"op": "stats", "pad": "x" * 1000}).encode() + b"\n")
    assert answers == [{"error": "request longer than 1024 bytes"}]
    assert raw(server.path, b"[1, 2]\n") == [{"error": "a request is a JSON object"}]
    assert list(control.request(server.path, {"op": "stats"}))[-1] == {"result": {"ok": True}}


def test_connections_beyond_the_limit_are_told_the_daemon_is_busy(server):
    threads_before = threading.active_count()
    answers = {}

    def client(n):
        answers[n] = list(control.request(server.path, {"op": "slow", "n": n}))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    for c in clients:
        c.start()
    for _ in range(200):
        if len(server.started) == 2:
            break
        time.sleep(0.01)
    assert sorted(server.started) == [0, 1]
    busy = [list(control.request(server.path, {"op": "stats"})) for _ in range(5)]
    assert all(len(b) == 1 and "busy" in b[0]["error"] for b in busy)
    # two clients, two serving threads, nothing per refused connection
    assert threading.active_count() <= threads_before + 4
    server.release.set()
    for c in clients:
        c.join(5)
    assert answers[0][-1] == {"result": {"n": 0}} and answers[1][-1] == {"result": {"n": 1}}
    assert list(control.request(server.path, {"op": "stats"}))[-1] == {"result": {"ok": True}}


def test_a_silent_client_loses_its_slot(server):
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in silent:
            s.connect(f"{server.path}/{control.SOCKET_NAME}")
        time.sleep(0.05)
        assert "busy" in list(control.request(server.path, {"op": "stats"}))[0]["error"]
        time.sleep(0.8)  # past io_timeout: both slots are free again
        assert list(control.request(server.path, {"op": "stats"})) == [{"result": {"ok": True}}]
    finally:
        for s in silent:
            s.close()
