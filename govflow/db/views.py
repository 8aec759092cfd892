"""Read-only queries behind the HTTP API and the dashboard: step plans and throughput."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import kwargs_row

from govflow.db.batch import id_array


class PlannedStep(msgspec.Struct, frozen=True, kw_only=True):
    """One action of an execution's workflow version, and how far it got.

    ``status`` is ``pending`` for a step that has not been tried yet, else the step row's
    (``running``, ``failed`` or ``completed``).
    """

    step: int
    action: str
    status: str
    attempts: int
    error: str | None
    updated_at: datetime | None


class Bucket(msgspec.Struct, frozen=True):
    """Executions that completed in the ``seconds`` starting at ``start``."""

    start: datetime
    completed: int


async def step_plans(
    conn: AsyncConnection[Any], execution_ids: Sequence[str]
) -> dict[str, list[PlannedStep]]:
    """Every step of each execution's workflow version, in order, with its status."""
    if not execution_ids:
        return {}
    query = (
        "SELECT e.id::text AS execution_id, a.step::int AS step,"
        " (SELECT k FROM jsonb_object_keys(a.action) AS k LIMIT 1) AS action,"
        " coalesce(s.status, 'pending') AS status, coalesce(s.attempts, 0) AS attempts,"
        " s.error, s.updated_at"
        " FROM workflow_executions e"
        " JOIN workflows w ON w.name = e.workflow_name AND w.version = e.workflow_version"
        " CROSS JOIN LATERAL jsonb_array_elements(w.definition -> 'actions')"
        " WITH ORDINALITY AS a(action, step)"
        " LEFT JOIN execution_steps s ON s.execution_id = e.id AND s.step = a.step"
        " WHERE e.id = ANY(%s::uuid[]) ORDER BY e.id, a.step"
    )
    plans: dict[str, list[PlannedStep]] = {i: [] for i in execution_ids}
    async with conn.cursor(row_factory=kwargs_row(_planned)) as cur:
        await cur.execute(query.encode(), (id_array(execution_ids),))
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
