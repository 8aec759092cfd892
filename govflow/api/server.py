"""The uvicorn side of ``govflow serve``: imported only when the API is served."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Iterator

import anyio
import uvicorn

from govflow.api.app import create_app
from govflow.schemas.settings import Settings


async def serve_on(
    sock: socket.socket, settings: Settings, *, announce: Callable[[str], None]
) -> None:
    """Serve the API on an already-listening socket until SIGINT or SIGTERM.

    Args:
        sock: the listening socket.
        settings: the settings, with both URLs set.
        announce: told the URL served, once the app is built and just before serving.
    """
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
    announce(f"http://{shown}:{port}/")
    server = _Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, server)
        await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


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
