"""The job, as each Python peer runs it: SQL on the tables of the peer's own schema.

Task 1 records the execution row (one commit) and enqueues task 2; task 2 writes the
task and the assignment and marks the execution completed (one transaction). Every
statement is idempotent, as a redelivered job must be harmless.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres")
SCHEMA = os.environ.get("BENCH_SCHEMA", "bench_peer")  # an identifier the harness made
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
NAMESPACE = uuid.UUID("6c1f7d4e-3b0a-4f2e-9a51-0c9e7f3d2b18")

INSERT_EXECUTION = (
    f"INSERT INTO {SCHEMA}.workflow_executions (id, workflow_name, workflow_version, event_id,"
    " entity_type, entity_id, tenant, event_occurred_at)"
    " VALUES (%s, 'bench-drain', 1, %s, 'policy', %s, 'default', to_timestamp(%s))"
    " ON CONFLICT (tenant, event_id, workflow_name) DO NOTHING"
)
INSERT_TASK = (
    f"INSERT INTO {SCHEMA}.tasks (execution_id, step, entity_id, title, assignee)"
    " VALUES (%s, 1, %s, %s, %s) ON CONFLICT (execution_id, step) DO NOTHING"
)
INSERT_ASSIGNMENT = (
    f"INSERT INTO {SCHEMA}.assignments (execution_id, step, entity_id, assignee)"
    " VALUES (%s, 2, %s, 'risk-team') ON CONFLICT (execution_id, step) DO NOTHING"
)
FINISH = (
    f"UPDATE {SCHEMA}.workflow_executions SET status = 'completed', last_error = NULL,"
    " updated_at = now(), finished_at = now() WHERE id = %s"
)


def execution_id(event_id: str) -> str:
    """The execution's id, derived from the event's, as govflow derives it."""
    return str(uuid.uuid5(NAMESPACE, f"{event_id}\x1fbench-drain"))


def record(conn: Any, event: dict[str, Any]) -> dict[str, Any]:
    """Task 1's SQL (autocommit: one commit); return task 2's argument."""
    exec_id = execution_id(event["id"])
    conn.execute(INSERT_EXECUTION, (exec_id, event["id"], event["entity_id"], event["at"]))
    return {"execution_id": exec_id, **event}


def effects(conn: Any, job: dict[str, Any]) -> None:
    """Task 2's SQL, in one transaction."""
    with conn.transaction():
        conn.execute(
            INSERT_TASK,
            (job["execution_id"], job["entity_id"], f"Review {job['title']}", job["owner"]),
        )
        conn.execute(INSERT_ASSIGNMENT, (job["execution_id"], job["entity_id"]))
        conn.execute(FINISH, (job["execution_id"],))


def event(run: str, i: int) -> dict[str, Any]:
    """The i-th event of a run; ``at`` is the publish time (seconds since the epoch)."""
    return {
        "id": f"{run}-{i}",
        "entity_id": f"POL-{i}",
        "title": f"Policy {i}",
        "owner": f"user-{i % 50}",
        "at": time.time(),
    }


def paced(send: Callable[[list[dict[str, Any]]], None], run: str, n: int, rate: float) -> None:
    """Send ``n`` events, all at once (``rate`` 0) in chunks, or ``rate`` per second."""
    sent, started = 0, time.perf_counter()
    while sent < n:
        if rate <= 0:
            due = min(n, sent + 1000)
        else:
            due = min(n, int((time.perf_counter() - started) * rate) + 1)
            if due <= sent:
                time.sleep(max(0.0, (sent / rate) - (time.perf_counter() - started)))
                continue
        send([event(run, i) for i in range(sent, due)])
        sent = due


def report(n: int, seconds: float) -> None:
    """Tell the harness how the enqueueing went: one JSON line on stdout."""
    sys.stdout.write(json.dumps({"enqueued": n, "seconds": seconds}) + "\n")
    sys.stdout.flush()


def produce_from_argv(send: Callable[[list[dict[str, Any]]], None]) -> None:
    """``python -m <peer app> RUN N RATE``: send the run's events with ``send``, then report."""
    run, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    started = time.perf_counter()
    paced(send, run, n, rate)
    report(n, time.perf_counter() - started)
