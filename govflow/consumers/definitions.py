"""Workflow definitions as the workers see them: cached, and fresh within seconds."""

from __future__ import annotations

from typing import Any

import anyio
from psycopg_pool import AsyncConnectionPool

from govflow.db import workflows
from govflow.schemas.errors import PermanentError
from govflow.schemas.workflows import StoredWorkflow

REFRESH_S = 2.0


class Definitions:
    """The enabled definitions (re-read every ``REFRESH_S``) and any version by number."""

    def __init__(self, pool: AsyncConnectionPool[Any], refresh_s: float = REFRESH_S) -> None:
        self._pool = pool
        self._refresh_s = refresh_s
        self._enabled: list[StoredWorkflow] = []
        self._loaded_at = float("-inf")
        self._versions: dict[tuple[str, int], StoredWorkflow] = {}
        self._lock = anyio.Lock()

    async def enabled(self) -> list[StoredWorkflow]:
        """The latest enabled version of every workflow."""
        async with self._lock:
            if anyio.current_time() - self._loaded_at >= self._refresh_s:
                async with self._pool.connection() as conn:
                    self._enabled = await workflows.enabled_latest(conn)
                self._loaded_at = anyio.current_time()
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
