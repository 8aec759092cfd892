"""Queries on approvals and tasks: their outcomes, the decisions on them, their deadlines.

An approval or a task ends once, in one transaction that locks its row: a decision, a
completion or an expiry finds it still ``pending`` (``open``) or is refused. When the
execution waits on it, that transaction also moves the execution from ``waiting`` to
``queued``, so that Postgres says it has work to do whatever happens to the command that
resumes it (the reconciler emits a queued execution's command again once it is overdue).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import class_row

from govflow.db import fencing
from govflow.db.batch import id_array

Kind = Literal["approval", "task"]
ApprovalStatus = Literal["pending", "approved", "rejected", "expired"]
TaskStatus = Literal["open", "done", "expired"]


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """One person's decision on an approval."""

    by: str
    decision: Literal["approve", "reject"]
    comment: str | None
    decided_at: datetime


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    """An approval with its execution, entity and decisions."""

    id: str
    execution_id: str
    workflow_name: str
    step: int
    entity_type: str
    entity_id: str
    tenant: str
    approvers: list[str]
    required: int
    status: str
    wait: bool
    due_at: datetime | None
    created_at: datetime
    decided_at: datetime | None
    decisions: list[Decision] = []


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """A task with its execution and entity."""

    id: str
    execution_id: str
    workflow_name: str
    step: int
    entity_type: str
    entity_id: str
    tenant: str
    title: str
    assignee: str | None
    status: str
    wait: bool
    due_at: datetime | None
    created_at: datetime
    completed_by: str | None
    completed_at: datetime | None


class Ended(msgspec.Struct, frozen=True, kw_only=True):
    """An approval or task that has just got its outcome."""

    kind: Kind
    id: str
    execution_id: str
    status: str
    resumes: bool  # the execution waited on it, is not finished, and gets its command again
    created_at: datetime


# Looked up per execution, through the (execution_id, step) keys: a plain filter on the
# ids, on tables too fresh to have statistics, was planned as a scan of every task. The
# OFFSET keeps the lateral subquery from being flattened into a join: it runs once per id.
OUTCOMES = (
    "SELECT i.id::text, w.step, w.status FROM unnest(%s::uuid[]) AS i(id) CROSS JOIN LATERAL"
    " (SELECT step, status FROM approvals WHERE execution_id = i.id AND wait"
    " UNION ALL SELECT step, status FROM tasks WHERE execution_id = i.id AND wait OFFSET 0) AS w"
)


async def outcomes(conn: AsyncConnection[Any], ids: Sequence[str]) -> dict[str, dict[int, str]]:
    """The status of each approval and task a step waits on, by execution and step."""
    if not ids:
        return {}
    cur = await conn.execute(OUTCOMES, (id_array(ids),))
    found: dict[str, dict[int, str]] = {}
    for execution_id, step, status in await cur.fetchall():
        found.setdefault(execution_id, {})[step] = status
    return found


async def set_waiting(
    conn: AsyncConnection[Any], waits: Sequence[tuple[str, int]], *, started: bool = False
) -> None:
    """Show each (execution, step it waits at) ``waiting``; ``queued`` if already decided.

    Run under the executions' fence (``fencing.hold``): a decision that committed while
    this delivery ran found the execution ``running``; it emitted the resume command all
    the same, and the execution is shown ``queued`` here, so that Postgres says work is
    left (should that command be lost, the reconciler emits it again). ``started``: the
    deliveries were locked in this transaction and not claimed (``fencing.STARTED``).
    """
    if not waits:
        return
    await conn.execute(
        f"UPDATE workflow_executions e SET updated_at = now(), last_error = NULL{fencing.started_items(started)},"
        " status = CASE WHEN EXISTS (SELECT 1 FROM approvals a WHERE a.execution_id = e.id"
        " AND a.step = w.step AND a.status <> 'pending') OR EXISTS (SELECT 1 FROM tasks t"
        " WHERE t.execution_id = e.id AND t.step = w.step AND t.status <> 'open')"
        " THEN 'queued' ELSE 'waiting' END"
        " FROM unnest(%s::uuid[], %s::int[]) AS w(id, step) WHERE e.id = w.id".encode(),
        (id_array([w[0] for w in waits]), [w[1] for w in waits]),
    )


# A waiting execution is queued. One that is not finished but not waiting either (a
# delivery of it in flight: redelivered after a crash, say) is resumed too: the resume's
# delivery fences that one off, or finds the outcome it recorded (``set_waiting``).
_RESUMABLE = "status IN ('waiting', 'queued', 'running', 'retrying')"
_RESUME = (
    "UPDATE workflow_executions SET updated_at = now(),"
    " status = CASE status WHEN 'waiting' THEN 'queued' ELSE status END"
    f" WHERE id = %s AND {_RESUMABLE}"
)


class RefusedError(Exception):
    """A decision or completion that cannot be applied, and why (``status`` says which).

    ``ended`` is the approval or task the refusal expired (its due time had passed): catch
    the refusal inside the transaction and commit, so that the expiry stands.
    """

    def __init__(
        self, status: Literal[404, 409, 422], reason: str, ended: Ended | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.ended = ended


async def decide(
    conn: AsyncConnection[Any],
    approval_id: str,
    *,
    by: str,
    approve: bool,
    comment: str | None,
) -> Ended | None:
    """Record ``by``'s decision on an approval; return it if the approval got its outcome.

    Run in a transaction. An approval past its due time is expired here, as the deadline
    service would, and the decision refused: the deadline came first. The id may be any
    spelling of the uuid that Python reads (upper case, braces, ``urn:uuid:``).

    Raises:
        RefusedError: no such approval (404), already decided or expired, or a second decision
            by the same person (409), ``by`` is not one of its approvers (422).
    """
    given, approval_id = approval_id, _uuid_or_none(approval_id) or _NO_ID
    cur = await conn.execute(
        "SELECT a.status, a.approvers, a.required, coalesce(a.due_at <= now(), false),"
        " e.status = 'cancelled' FROM approvals a JOIN workflow_executions e"
        " ON e.id = a.execution_id WHERE a.id = %s FOR UPDATE OF a",
        (approval_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise RefusedError(404, f"no approval {given}")
    status, approvers, required, overdue, cancelled = row
    if cancelled and status == "pending":
        raise RefusedError(409, f"approval {given}: its execution was cancelled")
    if status == "pending" and overdue:
        expired = await _end(conn, "approval", approval_id, "expired")
        raise RefusedError(409, f"approval {approval_id} expired at its due time", expired)
    if status != "pending":
        raise RefusedError(409, f"approval {approval_id} is already {status}")
    if by not in approvers:
        raise RefusedError(
            422, f"{by!r} is not an approver of {approval_id} ({', '.join(approvers)})"
        )
    cur = await conn.execute(
        'INSERT INTO approval_decisions (approval_id, "by", decision, comment)'
        " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (approval_id, by, "approve" if approve else "reject", comment),
    )
    if cur.rowcount == 0:
        raise RefusedError(409, f"{by} has already decided on approval {approval_id}")
    if not approve:
        return await _end(conn, "approval", approval_id, "rejected")
    cur = await conn.execute(
        "SELECT count(*) FROM approval_decisions WHERE approval_id = %s AND decision = 'approve'",
        (approval_id,),
    )
    approvals = (await cur.fetchone() or (0,))[0]
    if approvals >= required:
        return await _end(conn, "approval", approval_id, "approved")
    return None


async def complete_task(conn: AsyncConnection[Any], task_id: str, *, by: str) -> Ended:
    """Mark a task ``done`` by ``by``. Run in a transaction; the id is read as ``decide``'s.

    Raises:
        RefusedError: no such task (404), already done or expired (409).
    """
    given, task_id = task_id, _uuid_or_none(task_id) or _NO_ID
    cur = await conn.execute(
        "SELECT t.status, coalesce(t.due_at <= now(), false), e.status = 'cancelled'"
        " FROM tasks t JOIN workflow_executions e ON e.id = t.execution_id"
        " WHERE t.id = %s FOR UPDATE OF t",
        (task_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise RefusedError(404, f"no task {given}")
    status, overdue, cancelled = row
    if cancelled and status == "open":
        raise RefusedError(409, f"task {given}: its execution was cancelled")
    if status == "open" and overdue:
        expired = await _end(conn, "task", task_id, "expired")
        raise RefusedError(409, f"task {task_id} expired at its due time", expired)
    if status != "open":
        raise RefusedError(409, f"task {task_id} is already {status}")
    return await _end(conn, "task", task_id, "done", by=by)


async def _end(
    conn: AsyncConnection[Any], kind: Kind, item_id: str, status: str, *, by: str | None = None
) -> Ended:
    """Give a locked approval or task its outcome, and queue the execution waiting on it."""
    if kind == "approval":
        sql = (
            "UPDATE approvals SET status = %s, decided_at = now() WHERE id = %s"
            " RETURNING execution_id::text, wait, created_at"
        )
        params: tuple[Any, ...] = (status, item_id)
    else:
        sql = (
            "UPDATE tasks SET status = %s, completed_by = %s, completed_at = now() WHERE id = %s"
            " RETURNING execution_id::text, wait, created_at"
        )
        params = (status, by, item_id)
    cur = await conn.execute(sql.encode(), params)
    row = await cur.fetchone()
    assert row is not None  # locked by the caller
    execution_id, wait, created_at = row
    resumes = False
    if wait:
        cur = await conn.execute(_RESUME.encode(), (execution_id,))
        resumes = cur.rowcount > 0
    return Ended(
        kind=kind,
        id=item_id,
        execution_id=execution_id,
        status=status,
        resumes=resumes,
        created_at=created_at,
    )


_EXPIRE = """
WITH due AS (SELECT id FROM {table} WHERE status = '{open}' AND due_at <= now()
             ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED),
ended AS (UPDATE {table} x SET status = 'expired', {stamp} = now() FROM due WHERE x.id = due.id
          RETURNING x.id, x.execution_id, x.wait, x.created_at),
queued AS (UPDATE workflow_executions e SET updated_at = now(),
           status = CASE e.status WHEN 'waiting' THEN 'queued' ELSE e.status END FROM ended
           WHERE e.id = ended.execution_id AND ended.wait AND e.{resumable} RETURNING e.id)
SELECT ended.id::text, ended.execution_id::text, ended.wait AND queued.id IS NOT NULL,
       ended.created_at
FROM ended LEFT JOIN queued ON queued.id = ended.execution_id
"""
_EXPIRE_APPROVALS = _EXPIRE.format(
    table="approvals", open="pending", stamp="decided_at", resumable=_RESUMABLE
)
_EXPIRE_TASKS = _EXPIRE.format(
    table="tasks", open="open", stamp="completed_at", resumable=_RESUMABLE
)


async def expire_due(conn: AsyncConnection[Any], limit: int) -> list[Ended]:
    """Expire up to ``limit`` approvals, and as many tasks, past their due time.

    One statement per table, through the partial index on open deadlines. Rows locked by
    a decision in progress are skipped (``SKIP LOCKED``): that decision ends them itself,
    and a later sweep finds whatever it left open.
    """
    ended: list[Ended] = []
    for kind, sql in (("approval", _EXPIRE_APPROVALS), ("task", _EXPIRE_TASKS)):
        cur = await conn.execute(sql.encode(), (limit,))
        ended += [
            Ended(
                kind=kind,  # type: ignore[arg-type]
                id=item_id,
                execution_id=execution_id,
                status="expired",
                resumes=resumes,
                created_at=created_at,
            )
            for item_id, execution_id, resumes, created_at in await cur.fetchall()
        ]
    return ended


_APPROVALS = (
    "SELECT a.id::text, a.execution_id::text, e.workflow_name, a.step, e.entity_type, a.entity_id,"
    " e.tenant, a.approvers, a.required, a.status, a.wait, a.due_at, a.created_at, a.decided_at,"
    " coalesce((SELECT jsonb_agg(jsonb_build_object('by', d.by, 'decision', d.decision,"
    " 'comment', d.comment, 'decided_at', d.decided_at) ORDER BY d.decided_at)"
    " FROM approval_decisions d WHERE d.approval_id = a.id), '[]')"
    " FROM approvals a JOIN workflow_executions e ON e.id = a.execution_id"
)


async def list_approvals(
    conn: AsyncConnection[Any],
    *,
    status: str | None = None,
    approver: str | None = None,
    entity_id: str | None = None,
    approval_id: str | None = None,
    execution_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Approval]:
    """Approvals, oldest first, filtered; each with its decisions."""
    where, params = _filters(
        ("a.status = %s", status),
        ("a.approvers ? %s", approver),
        ("a.entity_id = %s", entity_id),
        ("a.id = %s::uuid", _id_filter(approval_id)),
        ("a.execution_id = %s::uuid", _id_filter(execution_id)),
    )
    cur = await conn.execute(
        f"{_APPROVALS} WHERE {where} ORDER BY a.created_at, a.id LIMIT %s OFFSET %s".encode(),
        [*params, limit, offset],
    )
    return [
        Approval(
            **dict(zip(_APPROVAL_FIELDS, row[:-1], strict=True)),
            decisions=msgspec.convert(row[-1], list[Decision], strict=False),
        )
        for row in await cur.fetchall()
    ]


_APPROVAL_FIELDS = [f for f in Approval.__struct_fields__ if f != "decisions"]

_TASKS = (
    "SELECT t.id::text, t.execution_id::text, e.workflow_name, t.step, e.entity_type, t.entity_id,"
    " e.tenant, t.title, t.assignee, t.status, t.wait, t.due_at, t.created_at, t.completed_by,"
    " t.completed_at FROM tasks t JOIN workflow_executions e ON e.id = t.execution_id"
)


async def list_tasks(
    conn: AsyncConnection[Any],
    *,
    status: str | None = None,
    assignee: str | None = None,
    entity_id: str | None = None,
    task_id: str | None = None,
    execution_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Task]:
    """Tasks, oldest first, filtered."""
    where, params = _filters(
        ("t.status = %s", status),
        ("t.assignee = %s", assignee),
        ("t.entity_id = %s", entity_id),
        ("t.id = %s::uuid", _id_filter(task_id)),
        ("t.execution_id = %s::uuid", _id_filter(execution_id)),
    )
    async with conn.cursor(row_factory=class_row(Task)) as cur:
        await cur.execute(
            f"{_TASKS} WHERE {where} ORDER BY t.created_at, t.id LIMIT %s OFFSET %s".encode(),
            [*params, limit, offset],
        )
        return await cur.fetchall()


_NO_ID = "00000000-0000-0000-0000-000000000000"  # what an id that is no uuid finds: nothing


def _uuid_or_none(value: str) -> str | None:
    """``value`` as a uuid Postgres reads, or None (an id that cannot exist: no row has it)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _id_filter(value: str | None) -> str | None:
    """The parameter of a filter on a uuid column: ``value``, one matching nothing, or None."""
    if not value:
        return None
    return _uuid_or_none(value) or _NO_ID


def _filters(*clauses: tuple[str, str | None]) -> tuple[str, list[str]]:
    """The WHERE clause of the filters given a value, and their parameters."""
    used = [(sql, value) for sql, value in clauses if value is not None]
    return " AND ".join(["true", *(sql for sql, _ in used)]), [value for _, value in used]


class Waiting(msgspec.Struct, frozen=True):
    """Counts of the waiting work: for ``govflow lag`` and the metrics."""

    waiting: int  # executions waiting for a person
    timers_due: int  # deadlines past due and not yet fired
    approvals_pending: int
    tasks_open: int


async def count_waiting(conn: AsyncConnection[Any]) -> Waiting:
    """How much work waits for people, and how many deadlines are past due."""
    cur = await conn.execute(
        "SELECT (SELECT count(*) FROM workflow_executions WHERE status = 'waiting'),"
        " (SELECT count(*) FROM approvals WHERE status = 'pending' AND due_at <= now())"
        " + (SELECT count(*) FROM tasks WHERE status = 'open' AND due_at <= now()),"
        " (SELECT count(*) FROM approvals WHERE status = 'pending'),"
        " (SELECT count(*) FROM tasks WHERE status = 'open')"
    )
    row = await cur.fetchone()
    assert row is not None
    return Waiting(*(int(n) for n in row))
