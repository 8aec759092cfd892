"""The jobs, as each Python peer runs them: SQL on the tables of the peer's own schema.

The drain: task 1 records the execution row (one commit) and enqueues task 2; task 2
writes the task and the assignment and marks the execution completed (one transaction).
The notify scenario: task 1 records the execution row of ``bench-notify`` and enqueues
task 2, which POSTs the event to the receiver (``BENCH_WEBHOOK_URL``), then records the
notification and marks the execution completed (one transaction). Every statement is
idempotent, as a redelivered job must be harmless.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import queue
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres")
SCHEMA = os.environ.get("BENCH_SCHEMA", "bench_peer")  # an identifier the harness made
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
WEBHOOK_URL = os.environ.get("BENCH_WEBHOOK_URL", "")  # the notify scenario's receiver
# Jobs in flight per worker process in the notify scenario (``peers.IO_SLOTS``): the HTTP
# client's pool is sized to it.
IO_SLOTS = int(os.environ.get("BENCH_IO_SLOTS", "64"))
# Postgres connections per worker process in the notify scenario, shared by its jobs in
# flight: a job holds one only for its SQL, not while it waits for the receiver.
DB_CONNECTIONS = 8
# The receiver checks nothing, but govflow signs every webhook: so do the peers.
SIGNING_KEY = b"bench-signing-key"
DRAIN, NOTIFY = "bench-drain", "bench-notify"  # the workflows' names, as govflow's
NAMESPACE = uuid.UUID("6c1f7d4e-3b0a-4f2e-9a51-0c9e7f3d2b18")

INSERT_EXECUTION = (
    f"INSERT INTO {SCHEMA}.workflow_executions (id, workflow_name, workflow_version, event_id,"
    " entity_type, entity_id, tenant, event_occurred_at)"
    " VALUES (%s, %s, 1, %s, %s, %s, 'default', to_timestamp(%s))"
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
INSERT_NOTIFICATION = (
    f"INSERT INTO {SCHEMA}.notifications (execution_id, step, webhook, message,"
    " idempotency_key, response_status) VALUES (%s, 1, %s, %s, %s, %s)"
    " ON CONFLICT (execution_id, step) DO NOTHING"
)
FINISH = (
    f"UPDATE {SCHEMA}.workflow_executions SET status = 'completed', last_error = NULL,"
    " updated_at = now(), finished_at = now() WHERE id = %s"
)


def execution_id(event_id: str, workflow: str = DRAIN) -> str:
    """The execution's id, derived from the event's, as govflow derives it."""
    return str(uuid.uuid5(NAMESPACE, f"{event_id}\x1f{workflow}"))


def execution_row(event: dict[str, Any], workflow: str = DRAIN) -> tuple[Any, ...]:
    """The parameters of ``INSERT_EXECUTION`` for an event of ``workflow``."""
    entity_type = "evidence" if workflow == NOTIFY else "policy"
    exec_id = execution_id(event["id"], workflow)
    return (exec_id, workflow, event["id"], entity_type, event["entity_id"], event["at"])


def record(conn: Any, event: dict[str, Any], workflow: str = DRAIN) -> dict[str, Any]:
    """Task 1's SQL (autocommit: one commit); return task 2's argument."""
    row = execution_row(event, workflow)
    conn.execute(INSERT_EXECUTION, row)
    return {"execution_id": row[0], **event}


def effects(conn: Any, job: dict[str, Any]) -> None:
    """Task 2's SQL, in one transaction."""
    with conn.transaction():
        conn.execute(
            INSERT_TASK,
            (job["execution_id"], job["entity_id"], f"Review {job['title']}", job["owner"]),
        )
        conn.execute(INSERT_ASSIGNMENT, (job["execution_id"], job["entity_id"]))
        conn.execute(FINISH, (job["execution_id"],))


def webhook(job: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The notify job's request: the JSON body govflow's ``notify`` sends, and its headers."""
    body = json.dumps(
        {
            "execution_id": job["execution_id"],
            "workflow": NOTIFY,
            "step": 1,
            "event_id": job["id"],
            "event_type": "evidence.created",
            "tenant": "default",
            "entity_id": job["entity_id"],
            "message": message(job),
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": idempotency_key(job),
        "X-Signature": "sha256=" + hmac.new(SIGNING_KEY, body, hashlib.sha256).hexdigest(),
    }
    return body, headers


def message(job: dict[str, Any]) -> str:
    """The notification's text, as ``bench-notify`` renders it."""
    return f"Evidence {job['entity_id']} recorded"


def idempotency_key(job: dict[str, Any]) -> str:
    """One key per execution and step: a redelivered job sends the same one."""
    return f"{job['execution_id']}:1"


def notified(conn: Any, job: dict[str, Any], status: int) -> None:
    """The notify job's SQL once the receiver answered: one transaction."""
    with conn.transaction():
        conn.execute(
            INSERT_NOTIFICATION,
            (job["execution_id"], WEBHOOK_URL, message(job), idempotency_key(job), status),
        )
        conn.execute(FINISH, (job["execution_id"],))


class Connections:
    """At most ``size`` Postgres connections, opened when first needed, lent one at a time.

    Built on ``queue.Queue``, so it serves OS threads and, once gevent has patched
    ``threading``, greenlets alike.
    """

    def __init__(self, size: int = DB_CONNECTIONS) -> None:
        self._idle: queue.Queue[psycopg.Connection[Any] | None] = queue.Queue()
        for _ in range(size):
            self._idle.put(None)  # a slot whose connection is not open yet

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """Wait for a free connection and lend it for the block."""
        conn = self._idle.get()
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(DATABASE_URL, autocommit=True)
            yield conn
        finally:
            self._idle.put(conn)


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


Send = Callable[[list[dict[str, Any]]], None]


def produce_from_argv(senders: Mapping[str, Send]) -> None:
    """``python -m <peer app> RUN N RATE [JOB]``: send the run's events as the first jobs of
    ``senders[JOB]`` (``drain`` when not given), then report."""
    run, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    send = senders[sys.argv[4] if len(sys.argv) > 4 else "drain"]
    started = time.perf_counter()
    paced(send, run, n, rate)
    report(n, time.perf_counter() - started)
