"""Workflow definitions as the workers see them: reloaded as soon as they change."""

from __future__ import annotations

from typing import Any

import anyio
from psycopg_pool import AsyncConnectionPool

from govflow.db import workflows
from govflow.schemas.errors import PermanentError
from govflow.schemas.workflows import StoredWorkflow


class Definitions:
    """The enabled definitions, as of the last change committed, and any version by number.

    Every ``enabled()`` reads the workflows' generation (one row) and reloads the
    definitions only when it moved: an event read after ``govflow workflows apply``
    committed is matched against what was applied.
    """

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        self._enabled: list[StoredWorkflow] = []
        self._generation: int | None = None
        self._versions: dict[tuple[str, int], StoredWorkflow] = {}
        self._lock = anyio.Lock()

    async def enabled(self) -> list[StoredWorkflow]:
        """The latest enabled version of every workflow."""
        async with self._lock, self._pool.connection() as conn:
            generation = await workflows.generation(conn)
            if generation != self._generation:
                # A change committed between these two reads is seen by the second and
                # reloaded again next time: never older than the generation read.
                self._enabled = await workflows.enabled_latest(conn)
                self._generation = generation
                for wf in self._enabled:
                    self._versions[(wf.name, wf.version)] = wf
        return self._enabled

    async def version(self, name: str, version: int) -> StoredWorkflow:
        """One version of a definition; versions never change, so it is cached for good.

        Raises:
            PermanentError: no such version (the command names a definition that is gone).
        """
        key = (name, version)
        if key not in self._versions:
            async with self._pool.connection() as conn:
                found = await workflows.get_version(conn, name, version)
            if found is None:
                raise PermanentError(f"workflow {name} version {version} does not exist")
            self._versions[key] = found
        return self._versions[key]
