"""``govflow serve``: the HTTP API, the dashboard and ``/metrics``, under uvicorn.

With no Redis or database URL set it uses the embedded servers, like every command. The
port is bound before uvicorn starts, so a port in use is one line on stderr (exit 2), not
a server log. SIGINT or SIGTERM stop it gracefully: requests in flight finish.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import anyio
import typer
import uvicorn

from ops.context import load_settings, run_async
from schemas.errors import ConfigError
from schemas.settings import Settings


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
        # SPEC: the embedded servers say so on start-up (the log level hides info here).
        _say(
            f"no URL set for {' and '.join(missing)}: starting the embedded "
            f"{' and '.join(missing)} under {Path(configured.data_dir).resolve()}"
        )
    run_async(functools.partial(_serve, sock))


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


async def _serve(sock: socket.socket, settings: Settings) -> None:
    from ops.api import create_app  # Litestar's imports: only for `serve`

    config = uvicorn.Config(
        create_app(settings),
        log_config=None,  # govflow's logging set-up stays in charge
        access_log=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    _say(f"serving the API and the dashboard on http://{shown}:{port}/ (Ctrl-C stops)")
    server = _Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, server)
        await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


def _say(line: str) -> None:
    sys.stderr.write(f"govflow: {line}\n")
    sys.stderr.flush()


class _Server(uvicorn.Server):
    """uvicorn's server, leaving the signals to govflow.

    uvicorn raises a signal it caught again once it has shut down, so the process would
    die of SIGTERM; govflow exits 0 after a graceful stop, as ``govflow run`` does.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _stop_on_signal(server: uvicorn.Server) -> None:
    """The first SIGINT or SIGTERM stops gracefully; a second one stops at once."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True
