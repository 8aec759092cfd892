"""Webhook delivery against receivers that misbehave: hardening of ``govflow.plugins.webhook``.

tests/test_webhook.py covers retries, signatures, 4xx and redirects through the pipeline;
here the delivery itself meets a host that never accepts the connection, one that drips
its answer a byte at a time, one that never finishes its body, a redirect to another
port, and the operator's allow-list (GOVFLOW_WEBHOOK_ALLOWED_HOSTS), down to a workflow
that names a host the list leaves out.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db.workflows import apply_workflow
from govflow.plugins import webhook
from govflow.producers.publish import Publisher
from govflow.runtime.worker import Worker
from govflow.schemas.codec import decode_workflow
from govflow.schemas.errors import PermanentError
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from tests.faults.receiver import receiving

pytestmark = pytest.mark.anyio

TIMEOUT = 1.0
BODY = b'{"hello": "world"}'


LOOPBACK = frozenset({"127.0.0.1"})  # where the receivers here listen


async def deliver(url: str, allowed: frozenset[str] = LOOPBACK) -> int:
    async with webhook.client(TIMEOUT, allowed) as http:
        return await webhook.deliver(
            http, url, BODY, idempotency_key="exec:1", keys=("s",), allowed=allowed
        )


@contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on a free port that reads a request, then lets ``answer`` misbehave."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                try:
                    answer(conn)
                except OSError:
                    pass  # the client gave up: that is the point

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@contextmanager
def never_accepting() -> Iterator[int]:
    """A port whose accept queue is full: a connection attempt hangs, unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@contextmanager
def redirecting(location: str) -> Iterator[int]:
    """An HTTP server that answers every POST with a 307 to ``location``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(307)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def self_signed_receiver(tmp_path: Path) -> Iterator[tuple[int, list[str]]]:
    """An HTTPS server on loopback whose certificate nobody signed; the paths it served."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    served: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], served
    finally:
        httpd.shutdown()
        httpd.server_close()


async def timed(call: Any) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        await call
    except Exception as e:
        return e, time.monotonic() - started
    return None, time.monotonic() - started


async def test_a_host_that_never_accepts_times_out_on_connect() -> None:
    with never_accepting() as port:
        error, took = await timed(deliver(f"http://127.0.0.1:{port}/hook"))
    assert isinstance(error, webhook.WebhookTimeoutError), error
    assert "timed out (ConnectionTimeoutError)" in str(error)
    assert took < TIMEOUT + 2


async def test_an_answer_dripped_a_byte_at_a_time_times_out_in_all() -> None:
    """Each byte comes within the read time-out; the whole answer never does."""

    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(200):
            conn.sendall(b"X")  # one byte of a header line that never ends
            time.sleep(TIMEOUT / 4)

    with raw_server(drip) as port:
        error, took = await timed(deliver(f"http://127.0.0.1:{port}/hook"))
    assert isinstance(error, webhook.WebhookTimeoutError), error  # retried, as a time-out
    assert took < TIMEOUT + 2


async def test_a_body_that_never_ends_is_not_waited_for() -> None:
    """The status is the answer: a receiver that said 200 was delivered to."""

    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        for _ in range(100):
            conn.sendall(b"x" * 65536)
            time.sleep(TIMEOUT / 4)

    with raw_server(endless) as port:
        error, took = await timed(deliver(f"http://127.0.0.1:{port}/hook"))
    assert error is None
    assert took < TIMEOUT


async def test_a_receiver_whose_certificate_nobody_signed_is_not_sent_to(tmp_path: Path) -> None:
    with self_signed_receiver(tmp_path) as (port, served):
        error, _ = await timed(deliver(f"https://127.0.0.1:{port}/hook"))
    assert isinstance(error, webhook.WebhookUnreachableError), error
    assert "Certificate" in str(error)  # retried: the receiver may fix its certificate
    assert served == []


async def test_a_redirect_to_another_port_of_the_same_host_is_refused() -> None:
    with receiving() as elsewhere, redirecting(elsewhere.url("/stolen")) as port:
        error, _ = await timed(deliver(f"http://127.0.0.1:{port}/hook"))
        assert isinstance(error, PermanentError), error
        assert "redirected" in str(error)
        assert elsewhere.count() == 0


async def test_with_no_allow_list_loopback_is_refused_unsent() -> None:
    with receiving() as hooks:
        error, _ = await timed(deliver(hooks.url("/hook"), frozenset()))
        assert isinstance(error, PermanentError), error
        assert "not a public address" in str(error)
        assert hooks.count() == 0


async def test_the_allow_list_admits_its_hosts_and_refuses_the_rest_unsent() -> None:
    with receiving() as hooks:
        assert await deliver(hooks.url("/ok"), frozenset({"127.0.0.1"})) == 200
        error, _ = await timed(deliver(hooks.url("/no"), frozenset({"hooks.example.org"})))
        assert isinstance(error, PermanentError), error
        assert "GOVFLOW_WEBHOOK_ALLOWED_HOSTS" in str(error)
        assert hooks.count("/ok") == 1
        assert hooks.count("/no") == 0


async def test_a_redirect_cannot_leave_the_allow_list() -> None:
    with receiving() as elsewhere:
        target = elsewhere.url("/stolen").replace("127.0.0.1", "localhost")
        with redirecting(target) as port:
            error, _ = await timed(
                deliver(f"http://127.0.0.1:{port}/hook", frozenset({"127.0.0.1"}))
            )
        assert isinstance(error, PermanentError), error
        assert elsewhere.count() == 0


async def test_a_url_with_a_password_is_not_repeated_in_the_error() -> None:
    error, _ = await timed(deliver("ftp://user:hunter2@files.example.org/drop"))
    assert isinstance(error, PermanentError), error
    assert "hunter2" not in str(error)


@pytest.mark.slow
async def test_a_workflow_naming_a_host_off_the_list_is_dead_lettered_at_once(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    with receiving() as hooks:
        settings = make_settings(webhook_allowed_hosts="hooks.example.org")
        keys = Keys(settings.prefix)
        definition = f"""
name: off-list
entity: policy
trigger: create
actions:
  - create_task: {{title: "Review"}}
  - notify: {{webhook: "{hooks.url("/hook")}"}}
"""
        async with pool.connection() as conn:
            await apply_workflow(conn, decode_workflow(definition))
        worker = Worker(settings, frozenset({"triggers", "actions"}), concurrency=1)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            try:
                await Publisher(redis, keys).publish(new_event("policy.created", "P1"))
                row = await poll(
                    pool, "SELECT status, attempts, last_error FROM workflow_executions"
                )
            finally:
                worker.stop()
        assert row[:2] == ("dead_lettered", 1)  # permanent: never retried
        assert "GOVFLOW_WEBHOOK_ALLOWED_HOSTS" in row[2]
        assert hooks.count() == 0


async def poll(pool: AsyncConnectionPool[Any], query: str) -> tuple[Any, ...]:
    """The one row ``query`` returns once it shows a terminal execution."""
    deadline = time.monotonic() + 60
    while True:
        async with pool.connection() as conn:
            cur = await conn.execute(query.encode())
            rows = await cur.fetchall()
        if rows and rows[0][0] in ("completed", "dead_lettered"):
            return tuple(rows[0])
        assert time.monotonic() < deadline, f"no terminal execution; last: {rows}"
        await anyio.sleep(0.1)
