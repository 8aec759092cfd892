"""Workflow definitions in Postgres: one row per version, a new version per change.

Definitions are stored as the JSON msgspec writes (``jsonb``) and decoded back into
``Workflow`` Structs, so what the matcher runs is exactly what ``apply`` validated.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection

from govflow.schemas.codec import encode
from govflow.schemas.workflows import StoredWorkflow, Workflow


class WorkflowVersion(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the ``workflows`` table, as ``govflow workflows list`` shows it."""

    name: str
    version: int
    entity: str
    trigger: str
    enabled: bool
    created_at: datetime
    definition: Workflow

    def stored(self) -> StoredWorkflow:
        """The version as the pipeline uses it."""
        return StoredWorkflow(name=self.name, version=self.version, definition=self.definition)


async def apply_workflow(conn: AsyncConnection[Any], wf: Workflow) -> tuple[int, bool]:
    """Store ``wf`` as a new version unless it equals the latest version of its name.

    Concurrent applies of one name are serialised by a transaction-scoped advisory lock,
    so two of them never pick the same version number or both store the same definition.

    Returns:
        ``(version, changed)``: the version that now holds ``wf``, and whether this call
        created it.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (wf.name,))
        cur = await conn.execute(
            "SELECT version, definition FROM workflows WHERE name = %s"
            " ORDER BY version DESC LIMIT 1",
            (wf.name,),
        )
        latest = await cur.fetchone()
        if latest is not None:
            version, definition = latest
            if _decode(definition) == wf:
                return version, False
        version = 1 if latest is None else latest[0] + 1
        await conn.execute(
            "INSERT INTO workflows (name, version, entity, trigger, definition, enabled)"
            " VALUES (%s, %s, %s, %s, %s::jsonb, %s)",
            (wf.name, version, wf.entity, wf.trigger, encode(wf).decode(), wf.enabled),
        )
    return version, True


async def set_enabled(
    conn: AsyncConnection[Any], name: str, enabled: bool
) -> tuple[int, bool] | None:
    """Switch the latest version of ``name`` on or off, under ``apply``'s lock for the name.

    The workers see it at their next batch, as they see an apply (``workflow_generation``).
    An ``apply`` of the same definition later leaves the switch as it is; a changed one
    makes a new version, enabled as its file says.

    Returns:
        ``(version, changed)``: the version switched, and whether this call switched it;
        ``None`` when no workflow has that name.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
        cur = await conn.execute(
            "SELECT version, enabled FROM workflows WHERE name = %s ORDER BY version DESC LIMIT 1",
            (name,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        version, current = row
        if current == enabled:
            return version, False
        await conn.execute(
            "UPDATE workflows SET enabled = %s WHERE name = %s AND version = %s",
            (enabled, name, version),
        )
    return version, True


async def latest_version(conn: AsyncConnection[Any], name: str) -> WorkflowVersion | None:
    """The latest version of one workflow, or ``None`` when no workflow has that name."""
    cur = await conn.execute(
        "SELECT name, version, entity, trigger, enabled, created_at, definition"
        " FROM workflows WHERE name = %s ORDER BY version DESC LIMIT 1",
        (name,),
    )
    row = await cur.fetchone()
    return None if row is None else _row(row)


async def list_workflows(
    conn: AsyncConnection[Any], *, all_versions: bool = False
) -> list[WorkflowVersion]:
    """List the latest version of every workflow (or every version), by name then version."""
    if all_versions:
        cur = await conn.execute(
            "SELECT name, version, entity, trigger, enabled, created_at, definition"
            " FROM workflows ORDER BY name, version"
        )
    else:
        cur = await conn.execute(
            "SELECT DISTINCT ON (name)"
            " name, version, entity, trigger, enabled, created_at, definition"
            " FROM workflows ORDER BY name, version DESC"
        )
    return [_row(row) for row in await cur.fetchall()]


async def enabled_latest(conn: AsyncConnection[Any]) -> list[StoredWorkflow]:
    """The latest version of every workflow whose latest version is enabled.

    Applying a version with ``enabled: false`` switches the workflow off; it does not fall
    back to an older enabled version.
    """
    return [row.stored() for row in await list_workflows(conn) if row.enabled]


async def generation(conn: AsyncConnection[Any]) -> int:
    """The counter every change to the workflows table moves on (in its transaction)."""
    cur = await conn.execute("SELECT generation FROM workflow_generation")
    row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def get_version(conn: AsyncConnection[Any], name: str, version: int) -> StoredWorkflow | None:
    """One version of one workflow, or ``None`` when there is no such version."""
    cur = await conn.execute(
        "SELECT name, version, entity, trigger, enabled, created_at, definition"
        " FROM workflows WHERE name = %s AND version = %s",
        (name, version),
    )
    row = await cur.fetchone()
    return None if row is None else _row(row).stored()


def _row(row: tuple[Any, ...]) -> WorkflowVersion:
    # The column order of every SELECT above.
    name, version, entity, trigger, enabled, created_at, definition = row
    return WorkflowVersion(
        name=name,
        version=version,
        entity=entity,
        trigger=trigger,
        enabled=enabled,
        created_at=created_at,
        definition=_decode(definition),
    )


def _decode(definition: Any) -> Workflow:
    # psycopg has already parsed the jsonb; msgspec validates it into the Struct again.
    return msgspec.convert(definition, Workflow)
