"""One entity's history as one list: its events, executions, steps, approvals, decisions and
tasks, oldest first (``GET /entities/{type}/{id}/timeline``).

Each item carries its ``kind`` and the time ``at`` it happened: an event when the trigger
matcher received it, an execution when it was created, a step when its status last
changed, an approval or a task when its step wrote it, a decision when it was made.
Items at the same instant (a step and the approval it wrote commit together) keep that
order: event, execution, step, approval or task, decision; steps of one instant (one
delivery) in their numbers' order.

The events come from ``received_events``, which keeps an event while it has unfinished
executions and for a retention period after: an older event is still listed, by its id
and the time it occurred, with ``type`` and its fields ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import class_row

from govflow.db.batch import id_array
from govflow.schemas.codec import decode_event
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.events import Change


class EventItem(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="event"):
    """An event about the entity that started at least one execution."""

    at: datetime
    id: str
    tenant: str
    occurred_at: datetime | None
    type: str | None  # None: the event is no longer kept
    actor: str | None = None
    data: dict[str, Any] | None = None
    changes: dict[str, Change] | None = None


class ExecutionItem(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="execution"):
    """A workflow run for one of the entity's events."""

    at: datetime
    id: str
    workflow_name: str
    workflow_version: int
    event_id: str
    status: str
    attempts: int
    last_error: str | None
    finished_at: datetime | None


class StepItem(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="step"):
    """One step of an execution, as it last stood."""

    at: datetime
    execution_id: str
    step: int
    action: str
    status: str
    attempts: int
    error: str | None


class ApprovalItem(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="approval"):
    """An approval a step asked for, and its outcome."""

    at: datetime
    id: str
    execution_id: str
    step: int
    approvers: list[str]
    required: int
    status: str
    due_at: datetime | None
    decided_at: datetime | None


class DecisionItem(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="decision"):
    """One person's decision on an approval."""

    at: datetime
    approval_id: str
    execution_id: str
    by: str
    decision: str
    comment: str | None


class TaskItem(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="task"):
    """A task a step opened, and whether it was done."""

    at: datetime
    id: str
    execution_id: str
    step: int
    title: str
    assignee: str | None
    status: str
    due_at: datetime | None
    completed_by: str | None
    completed_at: datetime | None


RowItem = TypeVar("RowItem", StepItem, ApprovalItem, DecisionItem, TaskItem)
Item = EventItem | ExecutionItem | StepItem | ApprovalItem | DecisionItem | TaskItem

# The order of items at the same instant: cause before effect.
_RANK: dict[type[Any], int] = {
    EventItem: 0,
    ExecutionItem: 1,
    StepItem: 2,
    ApprovalItem: 3,
    TaskItem: 3,
    DecisionItem: 4,
}


class _Execution(msgspec.Struct, frozen=True, kw_only=True):
    """The columns of an execution the timeline reads."""

    id: str
    tenant: str
    workflow_name: str
    workflow_version: int
    event_id: str
    event_occurred_at: datetime | None
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None


_EXECUTIONS = (
    "SELECT id::text, tenant, workflow_name, workflow_version, event_id, event_occurred_at,"
    " status, attempts, last_error, created_at, finished_at FROM workflow_executions"
    " WHERE entity_type = %s AND entity_id = %s AND (%s::text IS NULL OR tenant = %s)"
    " ORDER BY created_at DESC, id LIMIT %s"
)
_EVENTS = (
    "SELECT r.tenant, r.event_id, r.event, r.received_at FROM received_events r"
    " JOIN unnest(%s::text[], %s::text[]) AS k(tenant, event_id)"
    " ON r.tenant = k.tenant AND r.event_id = k.event_id"
)
_STEPS = (
    "SELECT updated_at AS at, execution_id::text, step, action, status, attempts, error"
    " FROM execution_steps WHERE execution_id = ANY(%s::uuid[]) ORDER BY updated_at, step"
)
_APPROVALS = (
    "SELECT created_at AS at, id::text, execution_id::text, step, approvers, required, status,"
    " due_at, decided_at FROM approvals WHERE execution_id = ANY(%s::uuid[])"
    " ORDER BY created_at, step"
)
_DECISIONS = (
    'SELECT d.decided_at AS at, d.approval_id::text, a.execution_id::text, d."by", d.decision,'
    " d.comment FROM approval_decisions d JOIN approvals a ON a.id = d.approval_id"
    " WHERE a.execution_id = ANY(%s::uuid[]) ORDER BY d.decided_at"
)
_TASKS = (
    "SELECT created_at AS at, id::text, execution_id::text, step, title, assignee, status,"
    " due_at, completed_by, completed_at FROM tasks WHERE execution_id = ANY(%s::uuid[])"
    " ORDER BY created_at, step"
)


async def read_timeline(
    conn: AsyncConnection[Any],
    entity_type: str,
    entity_id: str,
    *,
    tenant: str | None = None,
    limit: int = 100,
) -> list[Item]:
    """Everything about one entity's latest ``limit`` executions, oldest first.

    Args:
        entity_type: ``policy``, ``assessment`` or ``evidence``.
        entity_id: the entity's id.
        tenant: only this tenant's entity; None: every tenant's entity of that id.
        limit: how many of the entity's executions, the newest.
    """
    async with conn.cursor(row_factory=class_row(_Execution)) as cur:
        await cur.execute(_EXECUTIONS, (entity_type, entity_id, tenant, tenant, limit))
        runs = await cur.fetchall()
    if not runs:
        return []
    ids = id_array([r.id for r in runs])
    items: list[Item] = [*await _events(conn, runs), *map(_execution_item, runs)]
    items += await _rows(conn, StepItem, _STEPS, ids)
    items += await _rows(conn, ApprovalItem, _APPROVALS, ids)
    items += await _rows(conn, DecisionItem, _DECISIONS, ids)
    items += await _rows(conn, TaskItem, _TASKS, ids)
    return sorted(items, key=lambda item: (item.at, _RANK[type(item)]))


async def _rows(
    conn: AsyncConnection[Any], kind: type[RowItem], sql: str, ids: str
) -> list[RowItem]:
    """The items of one query over the executions ``ids``."""
    async with conn.cursor(row_factory=class_row(kind)) as cur:
        await cur.execute(sql.encode(), (ids,))
        return await cur.fetchall()


def _execution_item(run: _Execution) -> ExecutionItem:
    return ExecutionItem(
        at=run.created_at,
        id=run.id,
        workflow_name=run.workflow_name,
        workflow_version=run.workflow_version,
        event_id=run.event_id,
        status=run.status,
        attempts=run.attempts,
        last_error=run.last_error,
        finished_at=run.finished_at,
    )


async def _events(conn: AsyncConnection[Any], runs: Sequence[_Execution]) -> list[EventItem]:
    """The events of ``runs``, once each; those no longer kept by id and time alone."""
    first: dict[tuple[str, str], _Execution] = {}
    for run in sorted(runs, key=lambda r: r.created_at):
        first.setdefault((run.tenant, run.event_id), run)
    tenants, event_ids = zip(*first, strict=True)
    cur = await conn.execute(_EVENTS, (list(tenants), list(event_ids)))
    kept = {(tenant, event_id): (text, at) for tenant, event_id, text, at in await cur.fetchall()}
    items = []
    for key, run in first.items():
        text, at = kept.get(key, (None, run.created_at))
        items.append(_event_item(key, text, at, run.event_occurred_at))
    return items


def _event_item(
    key: tuple[str, str], text: str | None, at: datetime, occurred_at: datetime | None
) -> EventItem:
    tenant, event_id = key
    try:
        event = decode_event(text) if text is not None else None
    except InvalidEntryError:  # valid when taken; kept in a shape this version refuses
        event = None
    if event is None:
        return EventItem(at=at, id=event_id, tenant=tenant, occurred_at=occurred_at, type=None)
    return EventItem(
        at=at,
        id=event_id,
        tenant=tenant,
        occurred_at=event.occurred_at,
        type=event.type,
        actor=event.actor,
        data=event.data,
        changes=event.changes,
    )
