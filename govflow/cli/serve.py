"""``govflow serve``: the HTTP API, the dashboard and ``/metrics``, under uvicorn.

With no Redis or database URL set it uses the embedded servers, like every command. The
port is bound before uvicorn starts, so a port in use is one line on stderr (exit 2), not
a server log. SIGINT or SIGTERM stop it gracefully: requests in flight finish.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from redis import exceptions as redis_errors

from govflow.cli.context import load_settings, run_async
from govflow.core import deployment
from govflow.core.connect import connect
from govflow.schemas.errors import ConfigError
from govflow.schemas.settings import Settings

# Redis not answering at start-up (a cluster's client fails with its own exception).
_REDIS_AWAY = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)


def serve(
    host: Annotated[
        str, typer.Option(help="The address to listen on; 0.0.0.0 for every interface.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="The port; 0 picks a free one.")
    ] = 8000,
) -> None:
    """Serve the HTTP API, the dashboard (/) and Prometheus metrics (/metrics)."""
    sock = listen(host, port)
    configured = load_settings()
    missing = [
        name
        for name, url in (("Redis", configured.redis_url), ("Postgres", configured.database_url))
        if url is None
    ]
    if missing:
        # The embedded servers say so on start-up (the log level hides info here).
        say(
            f"no URL set for {' and '.join(missing)}: using the embedded "
            f"{' and '.join(missing)} under {Path(configured.data_dir).resolve()}"
        )
    # Imported here, not at the top: Litestar alone takes over half a second to import,
    # which every other command would pay for nothing.
    from govflow.api.server import serve_on

    async def checked(settings: Settings) -> None:
        await _check_deployment(settings)
        await serve_on(sock, settings, announce=_serving)

    run_async(checked, start=True, check=False)


async def _check_deployment(settings: Settings) -> None:
    """Refuse another deployment's database or partition count, where the servers answer.

    The API starts while Redis or Postgres is away (its requests answer 503 meanwhile), so
    a server that does not answer is not checked here; the publisher checks the partitions
    again before its first write.

    Raises:
        DeploymentMismatchError: the deployment recorded another prefix or partition count.
    """
    assert settings.redis_url is not None
    assert settings.database_url is not None
    with contextlib.suppress(psycopg.OperationalError):
        await deployment.check_prefix_at(settings.database_url, settings.prefix)
    with contextlib.suppress(*_REDIS_AWAY):
        client = await connect(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        try:
            await deployment.check_partitions(client, settings.keys())
        finally:
            await client.aclose()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises:
        ConfigError: the address cannot be bound (in use, not an address of this host).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


def _serving(url: str) -> None:
    say(f"serving the API and the dashboard on {url} (Ctrl-C stops)")


def say(line: str) -> None:
    sys.stderr.write(f"govflow: {line}\n")
    sys.stderr.flush()
