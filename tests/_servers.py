"""Helpers of the server fixtures: is a Docker engine there, and running async code once."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import anyio

REDIS_IMAGE = "redis:7-alpine"
POSTGRES_IMAGE = "postgres:16-alpine"
DOCKER_PROBE_TIMEOUT = 1.0


def docker_host() -> str:
    """Where the Docker engine is expected: ``DOCKER_HOST`` or the default socket."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def docker_engine_answers() -> bool:
    """Ping the Docker engine's ``/_ping`` with a short timeout; never hang."""
    where = urlsplit(docker_host())
    try:
        if where.scheme == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = where.path
        elif where.scheme in ("tcp", "http") and where.hostname:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (where.hostname, where.port or 2375)
        else:
            return False  # ssh:// or TLS: not worth probing here
        with s:
            s.settimeout(DOCKER_PROBE_TIMEOUT)
            s.connect(address)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return s.recv(64).split(b"\r\n", 1)[0].endswith(b" 200 OK")
    except OSError:
        return False


def run_async(func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``func(*args)`` to completion on an event loop of its own, in a thread.

    Session fixtures are synchronous; a thread keeps this loop away from the one the
    anyio plugin may be holding for the tests.
    """
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(anyio.run(func, *args))
        except BaseException as e:  # handed to the caller below
            errors.append(e)

    thread = threading.Thread(target=target, name="fixture-loop")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
