"""One execution in full, for the dashboard's detail view (``GET /executions/{id}/detail``).

Beside the execution's columns and progress: the event that started it (while Postgres
keeps it, see ``received_events``), every step of its workflow version with the steps of
its branches, each with its status, attempts, error and when it got there, and the
approvals and tasks its steps created, with the decisions taken on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection

from govflow.db import decisions, executions, views, workflows
from govflow.db.decisions import Approval, Task
from govflow.db.executions import ExecutionRow, Step
from govflow.db.fencing import TERMINAL
from govflow.schemas.flow import UNDECIDED, StepSpec

# More approvals or tasks than one execution has steps: every one of them.
_ALL = 1000


class StepDetail(msgspec.Struct, frozen=True, kw_only=True):
    """One step of an execution, from its definition and its row.

    ``status`` is the row's (``running``, ``failed``, ``completed``), else ``pending`` for a
    step still to come, or ``skipped`` for one this execution will not run: a branch of an
    outcome that did not happen, or a step after the execution ended.
    """

    step: int
    action: str
    branch_of: int | None  # the waiting step whose branch this step is in
    branch: str | None  # the outcome that runs the branch
    wait: bool
    status: str
    attempts: int
    error: str | None
    updated_at: datetime | None  # when the step last changed: done, or last failed
    after_s: float | None  # seconds from the execution's creation to ``updated_at``


class ExecutionDetail(ExecutionRow, frozen=True, kw_only=True):
    """An execution, the event that started it, its steps, approvals and tasks."""

    progress: views.Progress
    event_occurred_at: datetime | None
    event: dict[str, Any] | None  # None once the event is no longer kept
    steps: list[StepDetail]
    approvals: list[Approval]
    tasks: list[Task]


async def read_detail(conn: AsyncConnection[Any], execution_id: str) -> ExecutionDetail | None:
    """The detail of one execution, or ``None`` when there is no such execution."""
    found = await executions.get_execution(conn, execution_id)
    if found is None:
        return None
    plans = await views.step_plans(conn, [found.id])
    stored = await workflows.get_version(conn, found.workflow_name, found.workflow_version)
    specs = stored.definition.specs() if stored is not None else []
    approvals = await decisions.list_approvals(conn, execution_id=found.id, limit=_ALL)
    tasks = await decisions.list_tasks(conn, execution_id=found.id, limit=_ALL)
    occurred_at, event = await _event(conn, found.id)
    outcomes = {a.step: a.status for a in approvals} | {t.step: t.status for t in tasks}
    return ExecutionDetail(
        **executions.columns(found),
        progress=views.execution_view(found, plans.get(found.id, [])).progress,
        event_occurred_at=occurred_at,
        event=event,
        steps=step_details(specs, found.steps, outcomes, found.created_at, found.status),
        approvals=approvals,
        tasks=tasks,
    )


def step_details(
    specs: Sequence[StepSpec],
    rows: Sequence[Step],
    outcomes: Mapping[int, str],
    created_at: datetime,
    status: str,
) -> list[StepDetail]:
    """Every step of ``specs``, with what its row (if any) and the waits' outcomes say."""
    recorded = {row.step: row for row in rows}
    branch_outcome = {
        number: outcome
        for spec in specs
        for outcome, numbers in spec.branches.items()
        for number in numbers
    }
    details = []
    for spec in specs:
        row = recorded.get(spec.number)
        branch = branch_outcome.get(spec.number)
        details.append(
            StepDetail(
                step=spec.number,
                action=spec.action,
                branch_of=spec.branch_of,
                branch=branch,
                wait=spec.wait,
                status=row.status if row else _unrun(spec, branch, outcomes, status),
                attempts=row.attempts if row else 0,
                error=row.error if row else None,
                updated_at=row.updated_at if row else None,
                after_s=(row.updated_at - created_at).total_seconds() if row else None,
            )
        )
    return details


def _unrun(spec: StepSpec, branch: str | None, outcomes: Mapping[int, str], status: str) -> str:
    """The status of a step without a row: still to come, or never to run."""
    if status in TERMINAL:
        return "skipped"
    if spec.branch_of is None:
        return "pending"
    outcome = outcomes.get(spec.branch_of, "pending")
    return "pending" if outcome in UNDECIDED or outcome == branch else "skipped"


async def _event(
    conn: AsyncConnection[Any], execution_id: str
) -> tuple[datetime | None, dict[str, Any] | None]:
    """When the execution's event occurred, and the event itself while it is kept."""
    cur = await conn.execute(
        "SELECT e.event_occurred_at, r.event FROM workflow_executions e"
        " LEFT JOIN received_events r ON r.tenant = e.tenant AND r.event_id = e.event_id"
        " WHERE e.id = %s",
        (execution_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return None, None
    occurred_at, text = row
    event = msgspec.json.decode(text) if text is not None else None
    return occurred_at, event if isinstance(event, dict) else None
