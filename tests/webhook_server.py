"""A real HTTP server on a free loopback port that answers webhooks as a test scripts it.

``http.server`` in a thread: each path answers with the replies planned for it, one per
request, then with its last reply forever. Every request is recorded with its headers
and body, so a test can check what govflow sent and how many times.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec


class Reply(msgspec.Struct, frozen=True):
    """What the server does with one request: wait ``delay`` s (or, with ``hold``, until the
    test calls ``release()``), then answer ``status`` with ``headers``."""

    status: int = 200
    delay: float = 0.0
    location: str | None = None
    headers: dict[str, str] = {}
    hold: bool = False


class Received(msgspec.Struct, frozen=True):
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # when it arrived (time.time())


class WebhookServer:
    """The scripted server; use ``serve()`` to run one."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._plans: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.port = 0

    def release(self) -> None:
        """Let every held request (``Reply(hold=True)``) be answered, now and from now on."""
        self._released.set()

    def plan(self, path: str, *replies: Reply) -> str:
        """Answer requests to ``path`` with ``replies`` in turn, the last one forever."""
        with self._lock:
            self._plans[path] = list(replies)
        return self.url(path)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """The URL of ``path`` on this server."""
        return f"http://{host}:{self.port}{path}"

    def requests_to(self, path: str) -> list[Received]:
        """The requests ``path`` received, in order."""
        with self._lock:
            return [r for r in self.received if r.path == path]

    def _next(self, received: Received) -> Reply:
        with self._lock:
            self.received.append(received)
            plan = self._plans.get(received.path) or [Reply(404)]
            return plan.pop(0) if len(plan) > 1 else plan[0]


@contextmanager
def serve() -> Iterator[WebhookServer]:
    """Run a ``WebhookServer`` on 127.0.0.1 (a free port) until the block ends."""
    server = WebhookServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            received = Received(self.path, dict(self.headers.items()), body, time.time())
            reply = server._next(received)
            time.sleep(reply.delay)  # a slow receiver: the client may have given up by now
            if reply.hold:
                server._released.wait(30)
            try:
                self.send_response(reply.status)
                if reply.location is not None:
                    self.send_header("Location", reply.location)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the client timed out and hung up

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest's output for the test

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="webhook-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
