"""Workflow definitions as the workers see them: reloaded as soon as they change."""

from __future__ import annotations

import time
from typing import Any

import anyio
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from govflow.db import workflows
from govflow.db.pool import autocommit
from govflow.schemas.errors import PermanentError
from govflow.schemas.workflows import StoredWorkflow


class Definitions:
    """The enabled definitions, as of the last change committed, and any version by number.

    ``enabled()`` reads the workflows' generation (one row) and reloads the definitions
    only when it moved: an event read after ``govflow workflows apply`` committed is
    matched against what was applied. A batch passes when its entries were read, and a
    generation read begun since serves it: the consumers of a worker, and the stages of
    one batch, share one read.
    """

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        self._enabled: list[StoredWorkflow] = []
        self._generation: int | None = None
        self._read_at = float("-inf")  # when the last generation read began (monotonic)
        self._versions: dict[tuple[str, int], StoredWorkflow] = {}
        self._lock = anyio.Lock()

    async def enabled(self, since: float = float("inf")) -> list[StoredWorkflow]:
        """The latest enabled version of every workflow, as of a read begun after ``since``
        (a ``time.monotonic()``; by default, a read begun now)."""
        async with self._lock:
            if self._read_at >= since:
                return self._enabled
            read_at = time.monotonic()
            async with autocommit(self._pool) as conn:
                await self._reload(conn)
            self._read_at = read_at
        return self._enabled

    async def _reload(self, conn: AsyncConnection[Any]) -> None:
        """Read the generation, and the definitions when it moved."""
        generation = await workflows.generation(conn)
        if generation != self._generation:
            # A change committed between these two reads is seen by the second and
            # reloaded again next time: never older than the generation read.
            self._enabled = await workflows.enabled_latest(conn)
            self._generation = generation
            for wf in self._enabled:
                self._versions[(wf.name, wf.version)] = wf

    async def version(self, name: str, version: int) -> StoredWorkflow:
        """One version of a definition; versions never change, so it is cached for good.

        Raises:
            PermanentError: no such version (the command names a definition that is gone).
        """
        key = (name, version)
        if key not in self._versions:
            async with autocommit(self._pool) as conn:
                found = await workflows.get_version(conn, name, version)
            if found is None:
                raise PermanentError(f"workflow {name} version {version} does not exist")
            self._versions[key] = found
        return self._versions[key]
