"""The daemon's control socket: `STORE/control.sock`, a Unix stream socket (mode 0600: the owner
of the mount only). A client sends one JSON request line; the daemon answers with JSON lines —
progress lines, then a last line holding "result" or "error".

    {"op": "compact", "now": bool, "path": "dir/file" | null}
                     → {"done": n, "total": n} ... {"result": {...}}
    {"op": "stats"}  → {"result": {"compaction": {...}, "cache": {...}}}
    an unknown op, or a handler that raises → {"error": "..."}

compact: "path" limits it to the files at or below that path (relative to the filesystem's root),
"now" takes blocks however recently written (and flushes buffered writes first).

Threading: one accept thread; each connection is served on its own thread, so a long compaction
does not block a stats request. Both are bounded, though only the mount's owner can connect: a
request line longer than MAX_REQUEST bytes gets an error instead of being read into memory, a
client that sends nothing (or stops reading) for IO_TIMEOUT seconds is dropped, and at most
MAX_CLIENTS connections are served at once — one more is told the daemon is busy, on the accept
thread, so that a burst of connections cannot start a thread each.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger("llmfs")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 << 10  # bytes of one request line (a compaction's inode list stays far below)
MAX_CLIENTS = 4
IO_TIMEOUT = 30.0  # seconds a client may keep the daemon waiting on one read or write
BUSY_TIMEOUT = 1.0  # seconds the accept thread spends reading a refused request and answering


def _short_path(dir_fd: int) -> str:
    # sun_path holds 108 bytes; a store's path may be longer. /proc/self/fd/N/NAME is short and
    # resolves to the same directory entry.
    return f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}"


class ControlServer:
    def __init__(
        self,
        store_path: str,
        handlers: dict[str, Callable[[dict, Callable], dict]],
        max_clients: int = MAX_CLIENTS,
        max_request: int = MAX_REQUEST,
        io_timeout: float = IO_TIMEOUT,
    ):
        """handlers[op](request, send) -> result dict; send(dict) streams a progress line."""
        self.handlers = handlers
        self.max_clients = max_clients
        self.max_request = max_request
        self.io_timeout = io_timeout
        self._slots = threading.BoundedSemaphore(max_clients)
        self._dir_fd = os.open(store_path, os.O_RDONLY | os.O_DIRECTORY)
        path = _short_path(self._dir_fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._accept, name="llmfs-control", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                self._busy(conn)
                continue
            try:
                threading.Thread(target=self._serve_slot, args=(conn,), daemon=True).start()
            except BaseException:
                self._slots.release()
                conn.close()
                raise

    def _busy(self, conn: socket.socket) -> None:
        """Refuse a connection while MAX_CLIENTS are served. The request is read first (briefly):
        a Unix socket closed with unread data makes the client's read fail instead of showing
        the answer."""
        with conn:
            try:
                conn.settimeout(BUSY_TIMEOUT)
                with conn.makefile("rwb") as f:
                    f.readline(self.max_request + 1)
                    f.write(
                        json.dumps(
                            {"error": f"the daemon is busy with {self.max_clients} requests; try again"}
                        ).encode()
                        + b"\n"
                    )
                    f.flush()
            except OSError:
                pass
        log.warning("control request refused: %d requests in progress", self.max_clients)

    def _serve_slot(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.io_timeout)
        with conn, conn.makefile("rwb") as f:

            def send(obj: dict) -> None:
                f.write(json.dumps(obj).encode() + b"\n")
                f.flush()

            try:
                line = f.readline(self.max_request + 1)
                if len(line) > self.max_request:
                    log.warning("control request refused: longer than %d bytes", self.max_request)
                    send({"error": f"request longer than {self.max_request} bytes"})
                    return
                request = json.loads(line)
                if not isinstance(request, dict):
                    send({"error": "a request is a JSON object"})
                    return
                handler = self.handlers.get(request.get("op"))
                if handler is None:
                    send({"error": f"unknown request {request.get('op')!r}"})
                    return
                send({"result": handler(request, send)})
            except (OSError, ValueError) as e:
                log.warning("control request failed: %s", e)
            except Exception as e:
                log.exception("control request failed")
                try:
                    send({"error": str(e)})
                except OSError:
                    pass

    def close(self) -> None:
        try:
            os.unlink(_short_path(self._dir_fd))
        except OSError:
            pass
        self._sock.close()
        os.close(self._dir_fd)


def request(store_path: str, req: dict) -> Iterator[dict]:
    """Send a request to the daemon serving `store_path`; yield its answer lines."""
    dir_fd = os.open(store_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(_short_path(dir_fd))
    finally:
        os.close(dir_fd)
    with sock, sock.makefile("rwb") as f:
        f.write(json.dumps(req).encode() + b"\n")
        f.flush()
        for line in f:
            yield json.loads(line)
