"""The approvals scenario: executions waiting for a person, resumed by decisions.

A backlog of ``assessment.created`` events runs ``bench-approvals`` up to its waiting
approval; once every execution waits, each approval gets its decision, ``CONCURRENCY``
decisions in flight at a time, and the workers run the ``on_approved`` branch and the
step after it. Measured, from Postgres as the other scenarios are:

- resume throughput: executions completed per second, from the first decision's commit
  to the last completion's commit;
- resume latency: from a decision's commit (the approval row's commit timestamp, or its
  ``decided_at`` on a server without them) to its execution's completion commit.

The decisions go through the one operation every surface calls (``Decisions.decide``).
The HTTP route ``POST /approvals/{id}/decisions`` is the surface this scenario means;
``_decide`` is the one place to switch once it is served.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
from psycopg import sql
from redis.asyncio import Redis

from benchmarks import gf, workload
from govflow.db.pool import open_pool
from govflow.db.workflows import apply_workflow
from govflow.operations.decisions import Decisions
from govflow.schemas.codec import decode_workflow
from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys

WORKFLOW = """
name: bench-approvals
entity: assessment
trigger: create
actions:
  - create_approval:
      approvers: [reviewer]
      wait: true
      on_approved: [{assign: {assignee: risk-team}}]
  - create_task: {title: "Publish {data.title}"}
"""
APPROVER = "reviewer"
CONCURRENCY = 16  # decisions in flight, as many callers of the API would make them
VIA = "python"  # what carried the decisions (summary.json says so)


def setup(database_url: str) -> None:
    """Register the scenario's workflow (the drain's matches policies; this, assessments)."""

    async def apply() -> None:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            await apply_workflow(conn, decode_workflow(WORKFLOW, "bench"))

    anyio.run(apply)


def events(run: str, n: int) -> list[Event]:
    """The run's events, one waiting execution each."""
    return [
        new_event("assessment.created", f"ASM-{i}", data={"title": f"Assessment {i}"},
                  id=f"{run}-{i}")
        for i in range(n)
    ]  # fmt: skip


async def _decide(gf_api: Decisions, approval_id: str) -> None:
    """One decision (the line to make ``POST /approvals/{id}/decisions`` once it is served)."""
    await gf_api.decide(approval_id, by=APPROVER, approve=True)


async def _decide_all(redis_url: str, database_url: str, prefix: str, ids: list[str]) -> float:
    """Decide every approval of ``ids``, ``CONCURRENCY`` at a time; return the seconds taken."""
    pool = await open_pool(database_url, max_size=CONCURRENCY)
    redis = Redis.from_url(redis_url)
    try:
        api = Decisions(pool, redis, Keys(prefix))
        todo = iter(ids)

        async def caller() -> None:
            for approval_id in todo:  # the callers share one iterator: each id once
                await _decide(api, approval_id)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(CONCURRENCY):
                tg.start_soon(caller)
        return time.perf_counter() - started
    finally:
        await redis.aclose()
        await pool.close()


def _approvals(database_url: str, like: str) -> list[str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT a.id::text FROM approvals a JOIN workflow_executions e"
            " ON e.id = a.execution_id WHERE e.event_id LIKE %s AND a.status = 'pending'"
            " ORDER BY a.created_at",
            (like,),
        ).fetchall()
    return [row[0] for row in rows]


def measure(database_url: str, like: str, *, commit_ts: bool) -> dict[str, float]:
    """Resume throughput and latency of a finished run, read from Postgres."""
    accepted, done = (
        ("pg_xact_commit_timestamp(a.xmin)", "pg_xact_commit_timestamp(e.xmin)")
        if commit_ts
        else ("a.decided_at", "e.finished_at")
    )
    query = sql.SQL(
        "WITH r AS (SELECT {accepted} AS accepted_at, {done} AS done_at FROM approvals a"
        " JOIN workflow_executions e ON e.id = a.execution_id"
        " WHERE e.status = 'completed' AND e.event_id LIKE %s),"
        " l AS (SELECT 1000 * extract(epoch FROM done_at - accepted_at) AS ms FROM r)"
        " SELECT (SELECT count(*) FROM r),"
        " (SELECT extract(epoch FROM max(done_at) - min(accepted_at)) FROM r),"
        " (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM l),"
        " (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) FROM l)"
    ).format(accepted=sql.SQL(accepted), done=sql.SQL(done))
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(query, (like,)).fetchone()
    assert row is not None
    count, seconds, p50, p99 = (float(x or 0.0) for x in row)
    return {
        "resumed": count,
        "resume_s": seconds,
        "resume_per_s": count / seconds if seconds > 0 else 0.0,
        "resume_p50_ms": p50,
        "resume_p99_ms": p99,
    }


def run_once(
    redis_url: str,
    database_url: str,
    prefix: str,
    run: str,
    n: int,
    start_workers: Callable[[], list[subprocess.Popen[bytes]]],
    *,
    commit_ts: bool,
) -> dict[str, Any]:
    """``n`` executions brought to wait, then resumed by decisions; the run's figures.

    ``start_workers`` starts the worker processes for ``prefix`` and returns them.
    """
    workload.reset(database_url, "public")
    like = f"{run}-%"
    gf.publish(redis_url, prefix, events(run, n))
    procs = start_workers()

    def alive() -> bool:
        return all(p.poll() is None for p in procs)

    try:
        workload.wait_completed(database_url, "public", n, like=like, alive=alive,
                                status="waiting")  # fmt: skip
        ids = _approvals(database_url, like)
        decide_s = anyio.run(_decide_all, redis_url, database_url, prefix, ids)
        workload.wait_completed(database_url, "public", n, like=like, alive=alive)
    finally:
        gf.stop(procs)
        gf.cleanup(redis_url, prefix)
    return {
        "waiting": len(ids),
        "decide_per_s": len(ids) / decide_s if decide_s > 0 else 0.0,
        "via": VIA,
        **measure(database_url, like, commit_ts=commit_ts),
    }
