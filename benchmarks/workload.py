"""The job every system runs, and how the harness reads its results from Postgres.

Per event: an execution row, a task (``create_task``) and an assignment (``assign``), and
the execution marked ``completed``. govflow runs it as a workflow; each peer as two jobs
on the same tables, copied with ``CREATE TABLE ... (LIKE ... INCLUDING ALL)`` into a schema
of its own, so that every system pays for the same indexes and unique keys.

Throughput and latency are read from Postgres alone: a run lasts from the first execution
row's ``created_at`` to the commit of the last ``completed`` update
(``pg_xact_commit_timestamp(xmin)``; ``finished_at`` where commit timestamps are off), and
an event's latency runs from the time it was published (its ``occurred_at``, stored in
``event_occurred_at``) to that commit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

WORKFLOW = {
    "name": "bench-drain",
    "entity": "policy",
    "trigger": "create",
    "actions": [
        {"create_task": {"title": "Review {data.title}", "assignee": "{data.owner}"}},
        {"assign": {"assignee": "risk-team"}},
    ],
}
# The tables a peer's jobs write (the drain's, and the notify scenario's notifications),
# copied from govflow's schema.
PEER_TABLES = ("workflow_executions", "tasks", "assignments", "notifications")
STALL_S = 90.0  # no execution completed for this long: the run has failed
POLL_S = (0.2, 2.0)  # the shortest and the longest wait between two counts of a run


def event_fields(run: str, i: int) -> dict[str, Any]:
    """The parts of the i-th event of a run that every system receives."""
    return {
        "id": f"{run}-{i}",
        "entity_id": f"POL-{i}",
        "title": f"Policy {i}",
        "owner": f"user-{i % 50}",
    }


class WorkerDiedError(RuntimeError):
    """A worker process exited in the middle of a run."""


class StalledError(RuntimeError):
    """The workers are alive, but no execution completed for ``STALL_S``."""


@dataclass
class Result:
    """What one run of a drain or a steady load measured."""

    events: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def events_per_s(self) -> float:
        """Completed executions per second over the run."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


def commit_timestamps(database_url: str) -> bool:
    """Whether the server records commit times (``track_commit_timestamp``)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SHOW track_commit_timestamp").fetchone()
        return bool(row and row[0] == "on")


def create_peer_schema(database_url: str, schema: str) -> None:
    """A schema holding empty copies of govflow's tables, for one peer."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for table in PEER_TABLES:
            conn.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    sql.Identifier(schema, table), sql.Identifier("public", table)
                )
            )


def reset(database_url: str, schema: str) -> None:
    """Empty a system's tables and checkpoint, so that each run starts alike."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables = ["workflow_executions"] if schema == "public" else list(PEER_TABLES)
        conn.execute(
            sql.SQL("TRUNCATE {} CASCADE").format(
                sql.SQL(", ").join(sql.Identifier(schema, t) for t in tables)
            )
        )
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            pass  # a configured server where we are not superuser: runs are noisier


def completed(
    conn: psycopg.Connection[Any], schema: str, like: str = "%", status: str = "completed"
) -> int:
    """How many executions of events whose id is ``like`` are ``status`` (completed)."""
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE status = %s AND event_id LIKE %s").format(
            sql.Identifier(schema, "workflow_executions")
        ),
        (status, like),
    ).fetchone()
    return int(row[0]) if row else 0


def next_poll(left: int, done: int, elapsed: float) -> float:
    """Seconds to the next count: half the time the rest should take, within ``POLL_S``.

    A count reads every row counted so far, on the Postgres the system under test uses: a
    300,000-event drain counted every 0.2 s spent an eighth of Postgres's time on it. So a
    long run is counted seldom, and still often near its end.
    """
    if done <= 0 or elapsed <= 0:
        return POLL_S[0]
    return min(POLL_S[1], max(POLL_S[0], left / (done / elapsed) / 2))


def wait_completed(
    database_url: str,
    schema: str,
    expected: int,
    *,
    like: str = "%",
    alive: Any = None,
    timeout: float = 900.0,
    status: str = "completed",
) -> None:
    """Poll until ``expected`` executions are ``status`` (completed), on one connection.

    The figures come from the rows' commit times (``measure``), not from when this saw
    them, so the poll's pace changes none of them.

    Raises:
        WorkerDiedError: ``alive()`` said a worker died.
        StalledError: no progress for ``STALL_S``, or ``timeout`` passed.
    """
    started = time.monotonic()
    deadline = started + timeout
    last, last_change = -1, started
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            done = completed(conn, schema, like, status)
            now = time.monotonic()
            if done >= expected:
                return
            if done != last:
                last, last_change = done, now
            if alive is not None and not alive():
                raise WorkerDiedError(
                    f"a worker exited with {done} of {expected} executions {status}"
                )
            if now - last_change > STALL_S or now > deadline:
                raise StalledError(f"stalled at {done} of {expected} executions {status}")
            time.sleep(next_poll(expected - done, done, now - started))


def measure(database_url: str, schema: str, *, like: str = "%", commit_ts: bool = True) -> Result:
    """Read a finished run's duration and latencies from Postgres."""
    done = "pg_xact_commit_timestamp(xmin)" if commit_ts else "finished_at"
    query = sql.SQL(
        "WITH e AS (SELECT created_at, event_occurred_at, {done} AS done_at FROM {table}"
        " WHERE status = 'completed' AND event_id LIKE %s),"
        " l AS (SELECT 1000 * extract(epoch FROM done_at - event_occurred_at) AS ms FROM e)"
        " SELECT (SELECT count(*) FROM e),"
        " (SELECT extract(epoch FROM max(done_at) - min(created_at)) FROM e),"
        " (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM l),"
        " (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) FROM l),"
        " (SELECT max(ms) FROM l)"
    ).format(done=sql.SQL(done), table=sql.Identifier(schema, "workflow_executions"))
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(query, (like,)).fetchone()
    assert row is not None
    count, seconds, p50, p99, worst = row
    return Result(
        events=int(count),
        seconds=float(seconds or 0.0),
        p50_ms=float(p50 or 0.0),
        p99_ms=float(p99 or 0.0),
        max_ms=float(worst or 0.0),
    )
