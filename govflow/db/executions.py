"""Queries on ``workflow_executions`` and ``execution_steps``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import class_row

from govflow.db import fencing, reconcile
from govflow.db.batch import Batched, id_array
from govflow.db.fencing import TERMINAL

Status = Literal[
    "queued", "running", "retrying", "waiting", "completed", "dead_lettered", "cancelled"
]


class NewExecution(msgspec.Struct, frozen=True):
    """An execution the trigger matcher is about to record."""

    id: str
    workflow_name: str
    workflow_version: int
    event_id: str
    entity_type: str
    entity_id: str
    tenant: str
    occurred_at: datetime


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``execution_steps``."""

    step: int
    action: str
    status: str
    attempts: int
    error: str | None
    updated_at: datetime


class ExecutionRow(msgspec.Struct, frozen=True, kw_only=True):
    """The columns of ``workflow_executions``: what every view of an execution shows."""

    id: str
    workflow_name: str
    workflow_version: int
    event_id: str
    entity_type: str
    entity_id: str
    tenant: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class Execution(ExecutionRow, frozen=True, kw_only=True):
    """A row of ``workflow_executions``, with its steps when asked for."""

    total_steps: int = 0
    steps: list[Step] = []


def columns(execution: ExecutionRow) -> dict[str, Any]:
    """The ``ExecutionRow`` fields of an execution, to build another view of it."""
    return {name: getattr(execution, name) for name in ExecutionRow.__struct_fields__}


# A known execution is found by its identity, (tenant, event id, workflow), not by the id
# derived for it: a row recorded before tenants counted may have an id derived otherwise.
# One lookup by that unique key per row, whatever the statistics (``db.fencing``): as a
# join, it was planned as a scan of every unfinished execution, once per batch.
_NEW_EXECUTIONS = Batched(
    "WITH r AS MATERIALIZED (SELECT * FROM {rows}),"
    " new AS (INSERT INTO workflow_executions (id, workflow_name, workflow_version, event_id,"
    " entity_type, entity_id, tenant, event_occurred_at) SELECT id, workflow_name, workflow_version,"
    " event_id, entity_type, entity_id, tenant, occurred_at FROM r"
    " ON CONFLICT (tenant, event_id, workflow_name) DO NOTHING RETURNING id, workflow_version)"
    " SELECT id::text, id::text, workflow_version, true, 'queued', false FROM new UNION ALL"
    " SELECT r.id::text, e.id::text, e.workflow_version, false, e.status,"
    " coalesce(e.updated_at < now() - make_interval(secs => %s), false)"
    " FROM r CROSS JOIN LATERAL (SELECT id, workflow_version, status, updated_at"
    " FROM workflow_executions WHERE tenant = r.tenant AND event_id = r.event_id"
    " AND workflow_name = r.workflow_name LIMIT 1) AS e"
    " WHERE r.id NOT IN (SELECT id FROM new) AND e.status IN ('queued', 'running', 'retrying')",
    ("id uuid", "workflow_name text", "workflow_version int", "event_id text", "entity_type text",
     "entity_id text", "tenant text", "occurred_at timestamptz"),
)  # fmt: skip


class Queued(msgspec.Struct, frozen=True):
    """An execution waiting for its command: just recorded, or found unfinished.

    ``derived`` is the id the caller derived for it, ``id`` the row's own.
    """

    derived: str
    id: str
    workflow_version: int
    new: bool
    status: str
    stale: bool  # found unfinished and untouched for longer than the caller's bound


async def insert_queued(
    conn: AsyncConnection[Any],
    rows: Sequence[NewExecution],
    stale_after_s: float | None = None,
    taken: Sequence[reconcile.Received] = (),
) -> list[Queued]:
    """Record executions (a known one is left alone); return those new or still unfinished.

    An execution found still queued may have lost its command to a crash between this
    commit and the emit; one found unfinished and untouched for ``stale_after_s`` (unless
    ``None``) may have lost it to Redis. The caller emits those again. The version is the
    row's: a definition applied in between does not change what runs.

    ``taken``: the events the batch took up, recorded in ``received_events`` by the same
    statement (``reconcile.RECEIVED``), so that it commits alone where no transaction is
    open.
    """
    received = reconcile.received_parameters(taken)
    if not rows:
        if received:
            await conn.execute(reconcile.RECEIVED, received)
        return []
    sql = _NEW_EXECUTIONS.statement()
    parameters = [_NEW_EXECUTIONS.parameter([msgspec.structs.astuple(r) for r in rows])]
    if received:
        sql = f"WITH taken AS ({reconcile.RECEIVED}), {sql.removeprefix('WITH ')}"
        parameters = received + parameters
    cur = await conn.execute(sql.encode(), [*parameters, stale_after_s])
    return [Queued(*row) for row in await cur.fetchall()]


class State(msgspec.Struct, frozen=True):
    """Where an execution stands: its status, last error and completed steps."""

    status: str
    last_error: str | None
    done: frozenset[int]


# One lookup by primary key per id, for the execution and for its steps. As a join, on
# tables too fresh to have statistics (a backlog drained after a deploy), this was planned
# as a hash join over every step row; and a filter on ``id = ANY`` may scan the
# executions. The LIMIT keeps the lateral subquery from being flattened into a join, so
# it runs once per id, and the steps' subquery runs once per execution.
STATES = (
    "SELECT e.id::text, e.status, e.last_error, ARRAY(SELECT s.step FROM execution_steps s"
    " WHERE s.execution_id = e.id AND s.status = 'completed')"
    " FROM unnest(%s::uuid[]) AS i(id) CROSS JOIN LATERAL (SELECT id, status, last_error"
    " FROM workflow_executions WHERE id = i.id LIMIT 1) AS e"
)


async def states(conn: AsyncConnection[Any], ids: Sequence[str]) -> dict[str, State]:
    """The state of each execution that exists."""
    cur = await conn.execute(STATES, (id_array(ids),))
    return {row[0]: State(row[1], row[2], frozenset(row[3])) for row in await cur.fetchall()}


_COMPLETED_STEPS = Batched(
    "INSERT INTO execution_steps (execution_id, step, action, status, attempts)"
    " SELECT execution_id, step, action, 'completed', 1 FROM {rows}"
    " ON CONFLICT (execution_id, step) DO UPDATE SET status = 'completed',"
    " attempts = execution_steps.attempts + 1, error = NULL, updated_at = now()",
    ("execution_id uuid", "step int", "action text"),
)


async def complete_steps(conn: AsyncConnection[Any], steps: Sequence[tuple[str, int, str]]) -> None:
    """Mark (execution, step, action) completed; runs in the transaction of their effects."""
    if steps:
        await conn.execute(
            _COMPLETED_STEPS.statement().encode(), (_COMPLETED_STEPS.parameter(steps),)
        )


async def fail_step(
    conn: AsyncConnection[Any], execution_id: str, step: int, action: str, error: str
) -> None:
    """Record a failed try of a step."""
    await conn.execute(
        "INSERT INTO execution_steps (execution_id, step, action, status, attempts, error)"
        " VALUES (%s, %s, %s, 'failed', 1, %s)"
        " ON CONFLICT (execution_id, step) DO UPDATE SET status = 'failed',"
        " attempts = execution_steps.attempts + 1, error = excluded.error, updated_at = now()",
        (execution_id, step, action, error),
    )


FINISH = (
    "UPDATE workflow_executions SET status = 'completed', last_error = NULL,"
    " updated_at = now(), finished_at = now(){started} WHERE " + fencing.ROWS_BY_ID +
    " RETURNING id::text, event_occurred_at"
)  # fmt: skip


async def finish(
    conn: AsyncConnection[Any], ids: Sequence[str], *, started: bool = False
) -> list[tuple[str, datetime | None]]:
    """Mark executions completed; return (id, event time) of each for latency metrics.

    Run under the executions' fence (``fencing.hold``), which locked their rows;
    ``started``: their deliveries were locked in this transaction and not claimed.
    """
    cur = await conn.execute(
        FINISH.format(started=fencing.started_items(started)).encode(), (id_array(ids),)
    )
    return [(row[0], row[1]) for row in await cur.fetchall()]


async def queue_replayed(conn: AsyncConnection[Any], execution_id: str) -> None:
    """Show a ``dead_lettered`` execution ``queued`` again: its dead letter is replayed."""
    await conn.execute(
        "UPDATE workflow_executions SET status = 'queued', updated_at = now()"
        " WHERE id = %s AND status = 'dead_lettered'",
        (execution_id,),
    )


async def set_failed(
    conn: AsyncConnection[Any],
    execution_id: str,
    status: Status,
    error: str,
    *,
    started: bool = False,
) -> None:
    """Record a failed delivery: ``retrying`` or ``dead_lettered``, with the error;
    ``started`` as for ``finish``."""
    finished = "now()" if status in TERMINAL else "NULL"
    await conn.execute(
        f"UPDATE workflow_executions SET status = %s, last_error = %s, updated_at = now(),"
        f" finished_at = {finished}{fencing.started_items(started)} WHERE id = %s".encode(),
        (status, error, execution_id),
    )


_SELECT = (
    "SELECT e.id::text, e.workflow_name, e.workflow_version, e.event_id, e.entity_type,"
    " e.entity_id, e.tenant, e.status, e.attempts, e.last_error, e.created_at, e.updated_at,"
    " e.finished_at, jsonb_array_length(w.definition -> 'actions') AS total_steps"
    " FROM workflow_executions e JOIN workflows w"
    " ON w.name = e.workflow_name AND w.version = e.workflow_version"
)


async def list_executions(
    conn: AsyncConnection[Any],
    *,
    status: str | None = None,
    entity_id: str | None = None,
    workflow: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Execution]:
    """Executions, newest first, filtered."""
    where, params = ["true"], []
    for column, value in (
        ("e.status", status),
        ("e.entity_id", entity_id),
        ("e.workflow_name", workflow),
    ):
        if value is not None:
            where.append(f"{column} = %s")
            params.append(value)
    query = (
        f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY e.created_at DESC, e.id LIMIT %s OFFSET %s"
    )
    async with conn.cursor(row_factory=class_row(Execution)) as cur:
        await cur.execute(query.encode(), [*params, limit, offset])
        return await cur.fetchall()


async def get_execution(
    conn: AsyncConnection[Any], execution_id: str, *, with_steps: bool = True
) -> Execution | None:
    """One execution, with its recorded steps unless ``with_steps`` is false."""
    async with conn.cursor(row_factory=class_row(Execution)) as cur:
        await cur.execute(f"{_SELECT} WHERE e.id::text = %s".encode(), (execution_id,))
        execution = await cur.fetchone()
    if execution is None or not with_steps:
        return execution
    async with conn.cursor(row_factory=class_row(Step)) as cur:
        await cur.execute(
            "SELECT step, action, status, attempts, error, updated_at FROM execution_steps"
            " WHERE execution_id = %s ORDER BY step",
            (execution.id,),
        )
        steps = await cur.fetchall()
    return msgspec.structs.replace(execution, steps=steps)


async def count_by_status(conn: AsyncConnection[Any]) -> dict[str, int]:
    """How many executions are in each status."""
    cur = await conn.execute("SELECT status, count(*) FROM workflow_executions GROUP BY status")
    return {row[0]: int(row[1]) for row in await cur.fetchall()}
