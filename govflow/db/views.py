"""Read-only queries behind the HTTP API, the CLI and the dashboard.

``read_execution`` builds the one view of an execution that ``GET /executions/{id}``
answers and ``govflow executions show --json`` prints: its columns, its progress ("step 2
of 3") and every step of its workflow version, those not started yet included.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import kwargs_row

from govflow.db import executions, interventions
from govflow.db.batch import id_array
from govflow.db.executions import ExecutionRow
from govflow.db.interventions import Intervention


class PlannedStep(msgspec.Struct, frozen=True, kw_only=True):
    """One action of an execution's workflow version: ``step`` of ``of``, and how far it got.

    ``status`` is ``pending`` for a step that has not been tried yet, else the step row's
    (``running``, ``failed`` or ``completed``). A step of a branch (an approval's
    ``on_approved``, say) is numbered after the ``of`` actions and listed once it has run.
    """

    step: int
    of: int  # the steps of the version
    action: str
    status: str
    attempts: int
    error: str | None
    updated_at: datetime | None


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """How far an execution got: it is at ``step`` of ``of``; ``completed`` are done."""

    step: int
    of: int
    completed: int
    text: str


class ExecutionView(ExecutionRow, frozen=True, kw_only=True):
    """An execution, its progress and every step of its workflow version.

    ``completed_steps`` and ``total_steps`` say again what ``progress`` says: both
    shapes were read before the CLI and the API shared this view, so it keeps both.
    """

    progress: Progress
    completed_steps: int
    total_steps: int
    steps: list[PlannedStep]
    # Who cancelled or retried it, when and why, oldest first (``govflow executions cancel``).
    interventions: list[Intervention] = msgspec.field(default_factory=list)


class Bucket(msgspec.Struct, frozen=True):
    """Executions that completed in the ``seconds`` starting at ``start``."""

    start: datetime
    completed: int


def execution_view(
    execution: ExecutionRow,
    plan: Sequence[PlannedStep],
    done_to_it: Sequence[Intervention] = (),
) -> ExecutionView:
    """The view of ``execution``, from the plan ``step_plans`` gives for it."""
    actions = [s for s in plan if s.step <= s.of]  # the branches' steps are not counted
    completed = sum(1 for s in actions if s.status == "completed")
    total = len(actions)
    at = next((s.step for s in actions if s.status != "completed"), total)
    return ExecutionView(
        **executions.columns(execution),
        progress=Progress(step=at, of=total, completed=completed, text=f"step {at} of {total}"),
        completed_steps=completed,
        total_steps=total,
        steps=list(plan),
        interventions=list(done_to_it),
    )


async def read_execution(conn: AsyncConnection[Any], execution_id: str) -> ExecutionView | None:
    """The view of one execution, or ``None`` when there is no such execution."""
    # Without its recorded steps: the plan has them, the ones not started included.
    found = await executions.get_execution(conn, execution_id, with_steps=False)
    if found is None:
        return None
    return (await read_executions(conn, [found]))[0]


async def read_executions(
    conn: AsyncConnection[Any], found: Sequence[ExecutionRow]
) -> list[ExecutionView]:
    """The views of executions already read, in their order."""
    ids = [e.id for e in found]
    plans = await step_plans(conn, ids)
    done_to = await interventions.history(conn, ids)
    return [execution_view(e, plans.get(e.id, []), done_to.get(e.id, [])) for e in found]


async def step_plans(
    conn: AsyncConnection[Any], execution_ids: Sequence[str]
) -> dict[str, list[PlannedStep]]:
    """Every step of each execution's workflow version, in order, with its status."""
    if not execution_ids:
        return {}
    query = (
        "SELECT e.id::text AS execution_id, a.step::int AS step,"
        " jsonb_array_length(w.definition -> 'actions') AS \"of\","
        " (SELECT k FROM jsonb_object_keys(a.action) AS k LIMIT 1) AS action,"
        " coalesce(s.status, 'pending') AS status, coalesce(s.attempts, 0) AS attempts,"
        " s.error, s.updated_at"
        " FROM workflow_executions e"
        " JOIN workflows w ON w.name = e.workflow_name AND w.version = e.workflow_version"
        " CROSS JOIN LATERAL jsonb_array_elements(w.definition -> 'actions')"
        " WITH ORDINALITY AS a(action, step)"
        " LEFT JOIN execution_steps s ON s.execution_id = e.id AND s.step = a.step"
        " WHERE e.id = ANY(%(ids)s::uuid[])"
        " UNION ALL SELECT s.execution_id::text, s.step,"
        " jsonb_array_length(w.definition -> 'actions'), s.action, s.status, s.attempts, s.error,"
        " s.updated_at FROM execution_steps s JOIN workflow_executions e ON e.id = s.execution_id"
        " JOIN workflows w ON w.name = e.workflow_name AND w.version = e.workflow_version"
        " WHERE s.execution_id = ANY(%(ids)s::uuid[])"
        " AND s.step > jsonb_array_length(w.definition -> 'actions')"
        " ORDER BY 1, 2"
    )
    plans: dict[str, list[PlannedStep]] = {i: [] for i in execution_ids}
    async with conn.cursor(row_factory=kwargs_row(_planned)) as cur:
        await cur.execute(query.encode(), {"ids": id_array(execution_ids)})
        for execution_id, step in await cur.fetchall():
            plans.setdefault(execution_id, []).append(step)
    return plans


def _planned(execution_id: str, **step: Any) -> tuple[str, PlannedStep]:
    """A row of ``step_plans``' query: whose step, and the step."""
    return execution_id, PlannedStep(**step)


async def throughput(
    conn: AsyncConnection[Any], *, minutes: int = 10, bucket_s: int = 10
) -> list[Bucket]:
    """Completed executions per ``bucket_s`` over the last ``minutes``, oldest first.

    Every bucket is there, empty ones with 0, so a chart needs no gaps filled; buckets
    are aligned on the epoch, so two calls agree on their edges.
    """
    # A completed row's updated_at is its finished_at (or later): filtering on it as well
    # lets Postgres use the (status, updated_at) index.
    cur = await conn.execute(
        "WITH w AS (SELECT to_timestamp(floor(extract(epoch FROM now()) / %(b)s) * %(b)s)"
        " - make_interval(secs => %(span)s) AS first_start),"
        " buckets AS (SELECT generate_series(first_start, first_start"
        " + make_interval(secs => %(span)s), make_interval(secs => %(b)s)) AS start FROM w),"
        " done AS (SELECT to_timestamp(floor(extract(epoch FROM e.finished_at) / %(b)s) * %(b)s)"
        " AS start, count(*) AS n FROM workflow_executions e, w"
        " WHERE e.status = 'completed' AND e.updated_at >= w.first_start"
        " AND e.finished_at >= w.first_start GROUP BY 1)"
        " SELECT b.start, coalesce(d.n, 0)::int FROM buckets b LEFT JOIN done d USING (start)"
        " ORDER BY b.start",
        {"b": bucket_s, "span": minutes * 60 - bucket_s},
    )
    return [Bucket(start, completed) for start, completed in await cur.fetchall()]
