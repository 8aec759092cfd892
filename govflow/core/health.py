"""Whether this worker can reach Postgres: the signal its partition leases follow.

A worker cut off from Postgres can still renew its leases in Redis, and would keep its
partitions while it cannot run anything on them. ``PostgresHealth`` asks Postgres through
the workers' pool every ``interval`` (``SELECT 1``, within that interval) and remembers
when it last answered; ``consumers.partitions`` gives every partition up once that is
longer ago than a lease, so a healthy worker takes them over.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from govflow.core.service import run_every
from govflow.core.unavailable import UNAVAILABLE

log = structlog.get_logger(__name__)


class PostgresHealth:
    """Probe Postgres through ``pool`` every ``interval`` seconds until ``stop()``."""

    def __init__(self, pool: AsyncConnectionPool[Any], interval: float) -> None:
        self._pool = pool
        self._interval = interval
        self._answered_at = time.monotonic()  # the pool opened: Postgres answered
        self._reachable = True
        self._stopped = anyio.Event()

    def reached_within(self, seconds: float) -> bool:
        """Whether Postgres answered a probe in the last ``seconds``."""
        return time.monotonic() - self._answered_at < seconds

    def stop(self) -> None:
        """Stop probing."""
        self._stopped.set()

    async def run(self) -> None:
        """Probe until stopped."""
        await run_every(self._interval, self._probe, self._stopped)

    async def _probe(self) -> None:
        sent = time.monotonic()
        answered = False
        with anyio.move_on_after(self._interval):
            try:
                async with self._pool.connection(timeout=self._interval) as conn:
                    await conn.execute("SELECT 1")
                answered = True
            except (*UNAVAILABLE, psycopg.Error) as e:  # any failure: Postgres did not answer
                log.debug("postgres.probe_failed", error=str(e))
        if answered:
            self._answered_at = sent
        if answered != self._reachable:
            self._reachable = answered
            if answered:
                log.info("postgres.reachable")
            else:
                log.warning("postgres.unreachable", since_s=round(sent - self._answered_at, 1))
