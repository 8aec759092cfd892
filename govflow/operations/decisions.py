"""Deciding approvals and completing tasks: the one operation behind the CLI, the HTTP API
and the Python API.

A decision commits in one Postgres transaction (``db.decisions``); once it gives the
approval or task its outcome and the execution waited on it, the execution's command is
emitted again (``operations.resume``) and a worker runs the branch for the outcome. A
service that owns the user interface calls it directly::

    from govflow import Decisions

    async with Decisions.connect() as gf:
        approval = await gf.decide(approval_id, by="ciso", approve=True, comment="ok")

or, from synchronous code, ``govflow.decide(approval_id, by="ciso", approve=True)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Self

import anyio
import structlog
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.streams import RedisClient
from govflow.core import metrics
from govflow.db import decisions
from govflow.db.decisions import Approval, Ended, RefusedError, Task
from govflow.operations.resume import resume
from govflow.runtime.connections import database_pool, redis_client
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings

log = structlog.get_logger(__name__)

# One decision or completion, in the caller's transaction: what it ended, if anything.
Change = Callable[[AsyncConnection[Any]], Awaitable[Ended | None]]

__all__ = ["Decisions", "RefusedError", "complete_task", "decide"]


class Decisions:
    """Decide approvals and complete tasks of one deployment.

    Args:
        pool: a pool on govflow's database.
        redis: a client of govflow's Redis (to resume the executions that waited).
        keys: the deployment's key names.
    """

    def __init__(self, pool: AsyncConnectionPool[Any], redis: RedisClient, keys: Keys) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: Settings | None = None) -> AsyncIterator[Self]:
        """Open connections from ``settings`` (by default ``GOVFLOW_*`` from the environment).

        Raises:
            ConfigError: no ``GOVFLOW_REDIS_URL`` or ``GOVFLOW_DATABASE_URL``.
        """
        settings = settings or Settings.from_env()
        async with database_pool(settings, max_size=2) as pool, redis_client(settings) as redis:
            yield cls(pool, redis, settings.keys())

    async def decide(
        self, approval_id: str, *, by: str, approve: bool, comment: str | None = None
    ) -> Approval:
        """Record ``by``'s decision on an approval; return the approval as it stands now.

        Raises:
            RefusedError: no such approval (``status`` 404), already decided or expired,
                or decided by ``by`` before (409), ``by`` is not an approver (422).
        """
        await self._apply(
            lambda conn: decisions.decide(
                conn, approval_id, by=by, approve=approve, comment=comment
            )
        )
        async with self._pool.connection() as conn:
            (approval,) = await decisions.list_approvals(conn, approval_id=approval_id)
        return approval

    async def complete_task(self, task_id: str, *, by: str) -> Task:
        """Mark a task done by ``by``; return it.

        Raises:
            RefusedError: no such task (404), already done or expired (409).
        """
        await self._apply(lambda conn: decisions.complete_task(conn, task_id, by=by))
        async with self._pool.connection() as conn:
            (task,) = await decisions.list_tasks(conn, task_id=task_id)
        return task

    async def _apply(self, change: Change) -> None:
        """Commit ``change``, then resume what it ended.

        A refusal is raised after the commit: an expiry the change found (the due time had
        passed) stands, and resumes its execution.
        """
        error: RefusedError | None = None
        async with self._pool.connection() as conn, conn.transaction():
            try:
                ended = await change(conn)
            except RefusedError as refused:
                ended, error = refused.ended, refused
        await self._ended(ended)
        if error is not None:
            raise error

    async def _ended(self, ended: Ended | None) -> None:
        """Count an outcome, and resume the execution that waited on it."""
        if ended is None:
            return
        seconds = (datetime.now(UTC) - ended.created_at).total_seconds()
        metrics.DECISION_SECONDS.labels(ended.kind, ended.status).observe(seconds)
        if ended.status == "expired":
            metrics.DEADLINES_FIRED.labels(ended.kind).inc()
        if not ended.resumes:
            return
        try:
            await resume(self._redis, self._pool, self._keys, [ended.execution_id])
        except Exception as e:  # noqa: BLE001 - queued in Postgres: the reconciler emits it
            log.warning(
                "decision.resume_deferred",
                execution_id=ended.execution_id,
                error=f"{type(e).__name__}: {e}",
                reason="Redis out of reach; the execution is queued and will be put back",
            )


def decide(
    approval_id: str,
    *,
    by: str,
    approve: bool = True,
    comment: str | None = None,
    settings: Settings | None = None,
) -> Approval:
    """Decide an approval from synchronous code; see ``Decisions.decide``."""

    async def run() -> Approval:
        async with Decisions.connect(settings) as gf:
            return await gf.decide(approval_id, by=by, approve=approve, comment=comment)

    return anyio.run(run)


def complete_task(task_id: str, *, by: str, settings: Settings | None = None) -> Task:
    """Complete a task from synchronous code; see ``Decisions.complete_task``."""

    async def run() -> Task:
        async with Decisions.connect(settings) as gf:
            return await gf.complete_task(task_id, by=by)

    return anyio.run(run)
