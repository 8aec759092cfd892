"""The async Postgres connection pool, opened so that a bad URL fails at start-up."""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
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
# A connection back in the pool for less than this is lent without a check. A consumer
# takes two connections a batch: checking each cost a round trip to Postgres per
# checkout, a tenth of a worker's CPU under a steady load of small batches. A connection
# that broke meanwhile fails its transaction, which the consumer holds and tries again.
CHECK_AFTER_IDLE_S = 2.0


class _CappedAttempt(AttemptWithBackoff):
    """psycopg_pool's reconnection backoff, each delay at most ``RECONNECT_MAX_S``."""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_MAX_S)


class Pool(AsyncConnectionPool[Any]):
    """An ``AsyncConnectionPool`` whose reconnection backoff is capped, and which checks
    only connections idle for ``CHECK_AFTER_IDLE_S`` before lending them.

    It hands its own attempt to psycopg_pool's ``_add_connection`` (psycopg_pool 3.2 and
    3.3 start every reconnection there; ``tests/faults/test_health.py`` checks the cap holds).
    """

    def __init__(self, conninfo: str, **kwargs: Any) -> None:
        super().__init__(conninfo, check=self._check_if_idle, **kwargs)
        self._returned_at: weakref.WeakKeyDictionary[AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    async def putconn(self, conn: AsyncConnection[Any]) -> None:
        self._returned_at[conn] = time.monotonic()
        await super().putconn(conn)

    async def _check_if_idle(self, conn: AsyncConnection[Any]) -> None:
        returned_at = self._returned_at.get(conn)
        if returned_at is None or time.monotonic() - returned_at >= CHECK_AFTER_IDLE_S:
            await self.check_connection(conn)

    async def _add_connection(
        self, attempt: AttemptWithBackoff | None, growing: bool = False
    ) -> None:
        if attempt is None:
            attempt = _CappedAttempt(timeout=self.reconnect_timeout)
        await super()._add_connection(attempt, growing=growing)


async def configure(conn: AsyncConnection[Any]) -> None:
    """Set up a new connection of the pool: no JIT compilation, no sequential scans where
    an index serves.

    On tables too fresh to have statistics (a backlog drained after a deploy) the planner
    misjudges govflow's batch queries, every one a lookup by key: it compiled one (70 ms
    to save nothing), and on a table it took for a few pages it chose to scan it whole.
    A prepared statement keeps its plan as the table grows, so each batch went on scanning
    every execution. With sequential scans priced out, a table with no index for a query
    is still scanned.
    """
    await conn.execute("SET jit = off; SET enable_seqscan = off")
    await conn.commit()  # the pool lends only idle connections


async def open_pool(database_url: str, *, max_size: int = 10) -> AsyncConnectionPool[Any]:
    """Open a pool and wait for its first connection.

    The pool checks a connection idle for a while before lending it, so a Postgres restart
    costs one failed check rather than a failed transaction; it tries to reconnect at least every
    ``RECONNECT_MAX_S`` while Postgres is away.
    """
    pool = Pool(
        database_url,
        min_size=1,
        max_size=max_size,
        open=False,
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


@asynccontextmanager
async def autocommit(pool: AsyncConnectionPool[Any]) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection of ``pool`` on which each statement commits alone, for reads that need
    no transaction around them.

    In a transaction, a read costs three round trips to Postgres: the BEGIN psycopg sends
    before it, the read, and the COMMIT as the connection goes back; alone, one. The
    workers read the workflows' generation once a batch on each hop.
    """
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            yield conn
        finally:
            # A connection left mid-statement (cancelled) is closed by the pool instead.
            if conn.info.transaction_status == TransactionStatus.IDLE:
                await conn.set_autocommit(False)
