"""A webhook receiver on a free loopback port that records every delivery and can stall.

``http.server`` in a thread, one thread per request: a stalled request does not hold up
the others. ``stall(path, key, n)`` says how many seconds to sleep before answering the
``n``-th delivery (1-based) of ``Idempotency-Key`` ``key`` to ``path``, and
``answer(path, key, n)`` with which HTTP status (200 unless told).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Stall = Callable[[str, str, int], float]
Answer = Callable[[str, str, int], int]


class Receiver:
    """What the receiver got; use ``receiving()`` to run one."""

    def __init__(self, stall: Stall) -> None:
        self.stall = stall
        self.port = 0
        self.bodies: dict[str, list[bytes]] = {}  # by Idempotency-Key, in arrival order
        self.paths: dict[str, str] = {}  # Idempotency-Key -> path
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        """The URL of ``path`` here."""
        return f"http://127.0.0.1:{self.port}{path}"

    def deliveries(self) -> dict[str, list[bytes]]:
        """A copy of the bodies received, by Idempotency-Key."""
        with self._lock:
            return {k: list(v) for k, v in self.bodies.items()}

    def count(self, path: str | None = None) -> int:
        """Deliveries received (to ``path``, when given)."""
        with self._lock:
            return sum(
                len(bodies)
                for key, bodies in self.bodies.items()
                if path is None or self.paths[key] == path
            )

    def arrive(self, path: str, key: str, body: bytes) -> int:
        """Record one delivery; return which delivery of its key it is."""
        with self._lock:
            self.bodies.setdefault(key, []).append(body)
            self.paths[key] = path
            return len(self.bodies[key])


@contextmanager
def receiving(
    stall: Stall = lambda path, key, n: 0.0, answer: Answer = lambda path, key, n: 200
) -> Iterator[Receiver]:
    """Run a ``Receiver`` on 127.0.0.1 until the block ends."""
    receiver = Receiver(stall)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if len(body) < length:
                # The sender died between the headers and the body (they are separate
                # writes): a torn request no server would act on, and no answer reaches it.
                return
            key = self.headers.get("Idempotency-Key", "")
            n = receiver.arrive(self.path, key, body)
            time.sleep(receiver.stall(self.path, key, n))
            try:
                self.send_response(answer(self.path, key, n))
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the sender gave up waiting

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    receiver.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
