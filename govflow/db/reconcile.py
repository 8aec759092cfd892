"""Queries of reconciliation: the events the trigger matcher took, and work that is overdue.

Postgres is the record and Redis the queue. An execution still unfinished, or an outbox
row whose event was never taken up, long after it was last touched, is *overdue*; the
reconciler (``consumers.reconcile``) looks in Redis for what still carries it and puts
back what nothing carries. Every query here reads a bounded batch through an index.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection

from govflow.db.batch import Batched, id_array, text_array
from govflow.schemas.codec import decode_event
from govflow.schemas.commands import RunWorkflow
from govflow.schemas.errors import InvalidEntryError

UNFINISHED = ("queued", "running", "retrying")

# The events the matcher took up, recorded with their executions (``executions.insert_queued``).
# Arrays, not a Batched JSON document: an event's JSON may hold "\u0000", which a jsonb
# parameter refuses.
RECEIVED = (
    "INSERT INTO received_events (tenant, event_id, event)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])"
    " ON CONFLICT (tenant, event_id) DO UPDATE SET event = excluded.event"
    " WHERE received_events.event IS NULL AND excluded.event IS NOT NULL"
)


class Received(msgspec.Struct, frozen=True):
    """An event the matcher took: its identity, and its JSON when it matched a workflow."""

    tenant: str
    event_id: str
    event: str | None = None  # kept only when an execution may need it


def received_parameters(rows: Sequence[Received]) -> list[str]:
    """``RECEIVED``'s three arrays for ``rows``, events taken up; empty when there are none."""
    # One row per key per statement, in key order: two batches that share events lock
    # their keys in the same order, so they cannot deadlock.
    unique = sorted({(r.tenant, r.event_id): r for r in rows}.items())
    if not unique:
        return []
    columns = zip(*(msgspec.structs.astuple(r) for _, r in unique), strict=True)
    return [text_array(c) for c in columns]


class Unfinished(msgspec.Struct, frozen=True):
    """An unfinished execution, with the event the matcher kept for it."""

    id: str
    workflow_name: str
    workflow_version: int
    event_id: str
    entity_id: str
    updated_at: datetime
    event: str | None  # the event's JSON; None when the matcher did not keep it

    def command(self) -> RunWorkflow | None:
        """The command that runs this execution, rebuilt from its event; None without one."""
        if self.event is None:
            return None
        try:
            event = decode_event(self.event)
        except InvalidEntryError:
            return None
        return RunWorkflow(
            execution_id=self.id,
            workflow_name=self.workflow_name,
            workflow_version=self.workflow_version,
            event=event,
        )


# One index range scan per status on (status, updated_at): at most 3 * limit index entries.
_OVERDUE = " UNION ALL ".join(
    f"(SELECT id FROM workflow_executions WHERE status = '{status}'"
    " AND updated_at < now() - make_interval(secs => %(after)s)"
    " ORDER BY updated_at LIMIT %(limit)s)"
    for status in UNFINISHED
)
_WITH_EVENTS = (
    "SELECT e.id::text, e.workflow_name, e.workflow_version, e.event_id, e.entity_id,"
    " e.updated_at, r.event FROM workflow_executions e"
    " LEFT JOIN received_events r ON r.tenant = e.tenant AND r.event_id = e.event_id"
)
_OVERDUE_EXECUTIONS = (
    f"{_WITH_EVENTS} WHERE e.id IN ({_OVERDUE}) ORDER BY e.updated_at LIMIT %(limit)s"
)


async def overdue_executions(
    conn: AsyncConnection[Any], after_s: float, limit: int
) -> list[Unfinished]:
    """Up to ``limit`` unfinished executions untouched for ``after_s`` seconds, oldest first."""
    cur = await conn.execute(_OVERDUE_EXECUTIONS.encode(), {"after": after_s, "limit": limit})
    return [Unfinished(*row) for row in await cur.fetchall()]


async def with_events(conn: AsyncConnection[Any], ids: Sequence[str]) -> list[Unfinished]:
    """The executions ``ids`` that are not finished, each with its event."""
    cur = await conn.execute(
        f"{_WITH_EVENTS} WHERE e.id = ANY(%s::uuid[])"
        " AND e.status NOT IN ('completed', 'dead_lettered')".encode(),
        (id_array(ids),),
    )
    return [Unfinished(*row) for row in await cur.fetchall()]


_TOUCH = Batched(
    "UPDATE workflow_executions e SET updated_at = now() FROM {rows}"
    " WHERE e.id = r.id AND e.updated_at = r.updated_at"
    " AND e.status IN ('queued', 'running', 'retrying') RETURNING e.id::text",
    ("id uuid", "updated_at timestamptz"),
)


async def take_back(conn: AsyncConnection[Any], lost: Sequence[Unfinished]) -> set[str]:
    """Touch the executions still as they were read; return those (the others moved on).

    The touch restarts their bound: put back once, an execution is not put back again
    unless it is overdue again.
    """
    if not lost:
        return set()
    cur = await conn.execute(
        _TOUCH.statement().encode(), (_TOUCH.parameter([(x.id, x.updated_at) for x in lost]),)
    )
    return {row[0] for row in await cur.fetchall()}


# An outbox row's event counts as taken up once the matcher recorded it; a row that has no
# string id is not an event at all: the matcher dead-letters it, nothing is left to wait for.
_CONFIRM_TAKEN = (
    "UPDATE outbox o SET taken_at = now() WHERE o.id IN (SELECT id FROM outbox"
    " WHERE taken_at IS NULL AND published_at IS NOT NULL ORDER BY published_at LIMIT %s)"
    " AND (jsonb_typeof(o.event -> 'id') IS DISTINCT FROM 'string'"
    " OR EXISTS (SELECT 1 FROM received_events r"
    " WHERE r.event_id = o.event ->> 'id' AND r.tenant = CASE jsonb_typeof(o.event -> 'tenant')"
    " WHEN 'string' THEN o.event ->> 'tenant' ELSE '' END))"
)


async def confirm_taken(conn: AsyncConnection[Any], limit: int) -> int:
    """Mark up to ``limit`` published rows whose event was taken up; return how many."""
    cur = await conn.execute(_CONFIRM_TAKEN, (limit,))
    return cur.rowcount


class Untaken(msgspec.Struct, frozen=True):
    """A published outbox row whose event was not taken up within the bound."""

    id: int
    event: str  # the row's JSON
    event_id: str
    entity_id: str


_UNTAKEN = (
    "SELECT id, event::text, coalesce(event ->> 'id', ''), coalesce(event ->> 'entity_id', '')"
    " FROM outbox WHERE taken_at IS NULL"
    " AND published_at < now() - make_interval(secs => %s)"
    " ORDER BY published_at LIMIT %s FOR UPDATE SKIP LOCKED"
)


async def untaken_outbox(conn: AsyncConnection[Any], after_s: float, limit: int) -> list[Untaken]:
    """Up to ``limit`` rows published ``after_s`` seconds ago or more and not taken up."""
    cur = await conn.execute(_UNTAKEN, (after_s, limit))
    return [Untaken(*row) for row in await cur.fetchall()]


async def mark_republished(conn: AsyncConnection[Any], ids: Sequence[int]) -> None:
    """Restart the bound of rows published again."""
    if ids:
        await conn.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY(%s::bigint[])", (list(ids),)
        )


_COUNT_OVERDUE = (
    "SELECT (SELECT count(*) FROM workflow_executions"
    " WHERE status IN ('queued', 'running', 'retrying')"
    " AND updated_at < now() - make_interval(secs => %(after)s)),"
    " (SELECT count(*) FROM outbox WHERE taken_at IS NULL"
    " AND published_at < now() - make_interval(secs => %(after)s))"
)


async def count_overdue(conn: AsyncConnection[Any], after_s: float) -> tuple[int, int]:
    """How many executions and outbox rows are overdue: ``(executions, outbox rows)``."""
    cur = await conn.execute(_COUNT_OVERDUE, {"after": after_s})
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# A cancelled execution keeps its event too: `govflow executions retry` emits its command
# from it (govflow/operations/interventions.py).
_FORGET_RECEIVED = (
    "DELETE FROM received_events WHERE ctid IN (SELECT r.ctid FROM received_events r"
    " WHERE r.received_at < now() - make_interval(secs => %s) AND NOT EXISTS"
    " (SELECT 1 FROM workflow_executions e WHERE e.event_id = r.event_id"
    " AND e.tenant = r.tenant AND e.status NOT IN ('completed', 'dead_lettered'))"
    " LIMIT %s)"
)


async def forget_received(conn: AsyncConnection[Any], older_than_s: float, limit: int) -> int:
    """Delete up to ``limit`` received events older than ``older_than_s`` with nothing
    unfinished or cancelled left; return how many."""
    cur = await conn.execute(_FORGET_RECEIVED, (older_than_s, limit))
    return cur.rowcount
