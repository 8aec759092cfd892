"""One shape for govflow's background services: a tick, repeated until a stop event is set.

The janitor, the retry mover, the heartbeat and the relay each keep one ``anyio.Event``,
``_stopped``: ``stop()`` sets it, every wait of theirs ends as soon as it is set, and the
work in hand is finished, never cancelled (arq's "stop picking up jobs, wait"; psycopg
_pool's maintenance jobs all start and stop the same way). The worker calls ``stop()``
and gives ``run()`` the grace period to return.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

Tick = Callable[[], Awaitable[float | None]]


async def run_every(interval: float, tick: Tick, stopped: anyio.Event) -> None:
    """Call ``tick`` until ``stopped`` is set, waiting ``interval`` after each call.

    The wait runs from the end of a tick (a slow tick delays the next one, it never
    overlaps it) and ends early when ``stopped`` is set; a tick in progress is finished.

    Args:
        interval: seconds from the end of one tick to the start of the next.
        tick: one pass of the service. It handles its own errors, and returns ``None``
            to wait ``interval``, or the seconds to wait this time (a backoff after a
            failure).
        stopped: set by the service's ``stop()``.
    """
    while not stopped.is_set():
        delay = await tick()
        await wait_stopped(stopped, interval if delay is None else delay)


async def wait_stopped(stopped: anyio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``stopped``; return whether it is set."""
    with anyio.move_on_after(seconds):
        await stopped.wait()
    return stopped.is_set()
