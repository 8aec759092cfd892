"""The deadline service: approvals and tasks past their due time expire, once each.

Every worker with the ``actions`` role runs one. Each tick expires what is due in one
Postgres transaction (``db.decisions.expire_due``: one indexed statement per table,
however many deadlines are open, ``SKIP LOCKED`` so that workers share the work), then
emits the commands of the executions that waited on them. A deadline is durable because
it is a row: it fires after restarts, with every worker killed in between, at the first
tick of whichever worker comes up. A decision racing the expiry locks the same row: the
first to commit decides the outcome, the other finds it decided. An execution whose command
cannot be emitted (Redis away) is queued in Postgres: the service emits it with its next
tick's, and the reconciler puts it back should the worker die first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.streams import RedisClient
from govflow.core import metrics
from govflow.core.backoff import Backoff
from govflow.core.service import run_every
from govflow.db import decisions
from govflow.operations.resume import resume
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)

BATCH = 500  # approvals, and as many tasks, expired per transaction


class Deadlines:
    """Expire due approvals and tasks every ``interval`` seconds; resume what waited."""

    def __init__(
        self,
        redis: RedisClient,
        pool: AsyncConnectionPool[Any],
        keys: Keys,
        *,
        interval: float = 1.0,
        batch: int = BATCH,
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._interval = interval
        self._batch = batch
        self._backoff = Backoff()
        self._stopped = anyio.Event()
        # Executions this service queued and could not put on the commands stream yet
        # (Redis away): emitted with the next tick's, rather than left to the reconciler.
        self._unresumed: list[str] = []

    def stop(self) -> None:
        """Stop after the tick in hand."""
        self._stopped.set()

    async def run(self) -> None:
        """Fire what is due every ``interval`` seconds until stopped."""
        await run_every(self._interval, self._tick, self._stopped)

    async def _tick(self) -> float | None:
        try:
            fired = await self.fire()
        except Exception as e:  # noqa: BLE001 - the rows stay due: the next tick fires them
            log.warning("deadlines.failed", error=f"{type(e).__name__}: {e}")
            return self._backoff.next_delay()
        self._backoff.reset()
        return 0.0 if fired >= self._batch else None  # a full batch: more may be due

    async def fire(self) -> int:
        """Expire what is due now and resume the executions that waited; return how many.

        Raises:
            Exception: Postgres or Redis failed; what was expired stays expired, and its
                executions are resumed by the next call.
        """
        async with self._pool.connection() as conn, conn.transaction():
            ended = await decisions.expire_due(conn, self._batch)
        now = datetime.now(UTC)
        for e in ended:
            metrics.DEADLINES_FIRED.labels(e.kind).inc()
            metrics.DECISION_SECONDS.labels(e.kind, "expired").observe(
                (now - e.created_at).total_seconds()
            )
        if ended:
            log.info("deadlines.fired", count=len(ended))
        self._unresumed += [e.execution_id for e in ended if e.resumes]
        await resume(self._redis, self._pool, self._keys, self._unresumed)
        self._unresumed = []
        return len(ended)
