"""The async Postgres connection pool, opened so that a bad URL fails at start-up."""

from __future__ import annotations

from typing import Any

import anyio
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.base import AttemptWithBackoff

# The longest wait between two attempts to reconnect. psycopg_pool doubles it without a
# bound (1, 2, 4, ... s until ``reconnect_timeout``), so after a long outage a worker
# would go on waiting long after Postgres came back.
RECONNECT_MAX_S = 2.0
# How long a caller waits for a connection before the pool says Postgres is unavailable
# (psycopg_pool's default is 30 s). A consumer holding a batch learns of an outage within
# this, and so can stop when asked: a worker giving its partitions up waits for that.
CONNECTION_WAIT_S = 5.0


class _CappedAttempt(AttemptWithBackoff):
    """psycopg_pool's reconnection backoff, each delay at most ``RECONNECT_MAX_S``."""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_MAX_S)


class Pool(AsyncConnectionPool[Any]):
    """An ``AsyncConnectionPool`` whose reconnection backoff is capped.

    It hands its own attempt to psycopg_pool's ``_add_connection`` (psycopg_pool 3.2 and
    3.3 start every reconnection there; ``tests/faults/test_health.py`` checks the cap holds).
    """

    async def _add_connection(
        self, attempt: AttemptWithBackoff | None, growing: bool = False
    ) -> None:
        if attempt is None:
            attempt = _CappedAttempt(timeout=self.reconnect_timeout)
        await super()._add_connection(attempt, growing=growing)


async def configure(conn: AsyncConnection[Any]) -> None:
    """Set up a new connection of the pool: no JIT compilation.

    Postgres compiles a query when its estimated cost is high, and on tables too fresh to
    have statistics (a backlog drained after a deploy) the estimates of govflow's batch
    queries, lookups by key, run high: compiling one took 70 ms to save nothing.
    """
    await conn.execute("SET jit = off")
    await conn.commit()  # the pool lends only idle connections


async def open_pool(database_url: str, *, max_size: int = 10) -> AsyncConnectionPool[Any]:
    """Open a pool and wait for its first connection.

    The pool checks a connection before lending it, so a Postgres restart costs one failed
    check rather than a failed transaction; it tries to reconnect at least every
    ``RECONNECT_MAX_S`` while Postgres is away.
    """
    pool = Pool(
        database_url,
        min_size=1,
        max_size=max_size,
        open=False,
        check=Pool.check_connection,
        configure=configure,
        kwargs={"autocommit": False},
        reconnect_timeout=3600,
        timeout=CONNECTION_WAIT_S,
    )
    try:
        await pool.open(wait=True, timeout=30)
    except BaseException:  # a bad URL, or the caller cancelled: no pool left retrying
        with anyio.CancelScope(shield=True):
            await pool.close()
        raise
    return pool
