"""Queries behind ``govflow executions cancel|retry``: lock an execution, change its status,
and record who did it, when and why (``execution_interventions``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import class_row

from govflow.db.batch import id_array
from govflow.db.reconcile import Unfinished

Kind = Literal["cancel", "retry"]


class Intervention(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``execution_interventions``: an operator cancelled or retried an execution."""

    id: int
    execution_id: str
    kind: str
    from_status: str  # the execution's status when it was done
    actor: str
    reason: str | None
    dead_letter_id: int | None  # the dead letter a retry replayed
    created_at: datetime


class Locked(msgspec.Struct, frozen=True):
    """An execution locked for an intervention: its status, and what rebuilds its command."""

    status: str
    execution: Unfinished


_COLUMNS = "id, execution_id::text, kind, from_status, actor, reason, dead_letter_id, created_at"


async def lock(conn: AsyncConnection[Any], execution_id: str) -> Locked | None:
    """Lock one execution until the transaction ends; ``None`` when there is none.

    A worker writing for the execution holds its row (``db.fencing.hold``) until its
    commit: the lock waits for that commit, and the status read is the one it left.
    """
    cur = await conn.execute(
        "SELECT e.status, e.id::text, e.workflow_name, e.workflow_version, e.event_id,"
        " e.entity_id, e.updated_at, r.event FROM workflow_executions e"
        " LEFT JOIN received_events r ON r.tenant = e.tenant AND r.event_id = e.event_id"
        " WHERE e.id = %s::uuid FOR UPDATE OF e",
        (execution_id,),
    )
    row = await cur.fetchone()
    return None if row is None else Locked(row[0], Unfinished(*row[1:]))


async def mark_cancelled(conn: AsyncConnection[Any], execution_id: str) -> None:
    """End a locked execution as ``cancelled``, and bump its epoch: a delivery started
    before this writes nothing more (``db.fencing``)."""
    await conn.execute(
        "UPDATE workflow_executions SET status = 'cancelled', epoch = epoch + 1,"
        " updated_at = now(), finished_at = now() WHERE id = %s::uuid",
        (execution_id,),
    )


async def requeue(conn: AsyncConnection[Any], execution_id: str) -> None:
    """Make a locked execution ``queued`` again, for the command a retry emits."""
    await conn.execute(
        "UPDATE workflow_executions SET status = 'queued', updated_at = now(),"
        " finished_at = NULL WHERE id = %s::uuid",
        (execution_id,),
    )


async def record(
    conn: AsyncConnection[Any],
    execution_id: str,
    kind: Kind,
    *,
    from_status: str,
    actor: str,
    reason: str | None,
    dead_letter_id: int | None = None,
) -> Intervention:
    """Record an intervention; return its row."""
    async with conn.cursor(row_factory=class_row(Intervention)) as cur:
        await cur.execute(
            "INSERT INTO execution_interventions"
            " (execution_id, kind, from_status, actor, reason, dead_letter_id)"
            f" VALUES (%s::uuid, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}".encode(),
            (execution_id, kind, from_status, actor, reason, dead_letter_id),
        )
        row = await cur.fetchone()
    assert row is not None
    return row


async def history(
    conn: AsyncConnection[Any], execution_ids: Sequence[str]
) -> dict[str, list[Intervention]]:
    """The interventions on each of ``execution_ids`` that has any, oldest first."""
    found: dict[str, list[Intervention]] = {}
    if not execution_ids:
        return found
    async with conn.cursor(row_factory=class_row(Intervention)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM execution_interventions"
            " WHERE execution_id = ANY(%s::uuid[]) ORDER BY id".encode(),
            (id_array(execution_ids),),
        )
        for row in await cur.fetchall():
            found.setdefault(row.execution_id, []).append(row)
    return found


async def latest_dead_letter(conn: AsyncConnection[Any], execution_id: str) -> int | None:
    """The id of the last dead letter that holds the execution's command, open or not;
    ``None`` when there is none."""
    cur = await conn.execute(
        "SELECT id FROM dead_letters WHERE execution_id = %s::uuid AND payload ? 'command'"
        " ORDER BY id DESC LIMIT 1",
        (execution_id,),
    )
    row = await cur.fetchone()
    return None if row is None else int(row[0])
