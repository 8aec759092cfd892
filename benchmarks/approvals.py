"""The approvals scenario: executions waiting for a person, resumed by decisions.

A backlog of ``assessment.created`` events runs ``bench-approvals`` up to its waiting
approval; once every execution waits, each approval gets its decision through the HTTP
API (``POST /approvals/{id}/decisions`` on a ``govflow serve`` process, ``CONCURRENCY``
requests in flight), and the workers run the ``on_approved`` branch and the step after
it. Measured, from Postgres as the other scenarios are:

- resume throughput: executions completed per second, from the first decision's commit
  to the last completion's commit;
- resume latency: from a decision's commit (the approval row's commit timestamp, or its
  ``decided_at`` on a server without them) to its execution's completion commit.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
from psycopg import sql

from benchmarks import gf, workload
from benchmarks.servers import free_port
from govflow.db.workflows import apply_workflow
from govflow.schemas.codec import decode_workflow
from govflow.schemas.events import Event, new_event

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
VIA = "http"  # what carried the decisions (summary.json says so)
SERVE_TIMEOUT = 60.0  # for ``govflow serve`` to answer


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


def serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start ``govflow serve`` with a token that may decide; return it, its URL and token.

    Raises:
        WorkerDiedError: the server exited before it answered.
        StalledError: it did not answer within ``SERVE_TIMEOUT``.
    """
    token, port = secrets.token_hex(16), free_port()
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "govflow.cli", "serve", "--port", str(port)],
            cwd=gf.ROOT, env={**env, "GOVFLOW_API_TOKENS": f"{token}:decide"},
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVE_TIMEOUT
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url, token
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise workload.WorkerDiedError(f"govflow serve exited {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise workload.StalledError("govflow serve did not answer")
        time.sleep(0.2)


def stop_serving(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server and wait for it."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=gf.STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _decide_all(url: str, token: str, ids: list[str]) -> float:
    """Approve every approval of ``ids``, ``CONCURRENCY`` at a time; return the seconds.

    Raises:
        RuntimeError: a decision was not accepted (201).
    """
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:
        todo = iter(ids)

        async def caller() -> None:
            for approval_id in todo:  # the callers share one iterator: each id once
                answer = await c.post(
                    f"/approvals/{approval_id}/decisions",
                    json={"decision": "approve", "by": APPROVER},
                )
                if answer.status_code != 201:
                    raise RuntimeError(f"decision refused: {answer.status_code} {answer.text}")

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(CONCURRENCY):
                tg.start_soon(caller)
        return time.perf_counter() - started


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
    log: Path,
    *,
    commit_ts: bool,
) -> dict[str, Any]:
    """``n`` executions brought to wait, then resumed by decisions; the run's figures.

    ``start_workers`` starts the worker processes for ``prefix`` and returns them; the
    API server's log goes to ``log``.
    """
    workload.reset(database_url, "public")
    like = f"{run}-%"
    gf.publish(redis_url, prefix, events(run, n))
    procs = start_workers()
    server: subprocess.Popen[bytes] | None = None

    def alive() -> bool:
        return all(p.poll() is None for p in [*procs, *([server] if server else [])])

    try:
        server, url, token = serve(gf.env(redis_url, database_url, prefix), log)
        workload.wait_completed(database_url, "public", n, like=like, alive=alive,
                                status="waiting")  # fmt: skip
        ids = _approvals(database_url, like)
        decide_s = anyio.run(_decide_all, url, token, ids)
        workload.wait_completed(database_url, "public", n, like=like, alive=alive)
    finally:
        if server is not None:
            stop_serving(server)
        gf.stop(procs)
        gf.cleanup(redis_url, prefix)
    return {
        "waiting": len(ids),
        "decide_per_s": len(ids) / decide_s if decide_s > 0 else 0.0,
        "via": VIA,
        **measure(database_url, like, commit_ts=commit_ts),
    }
