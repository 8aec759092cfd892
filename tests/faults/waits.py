"""What the deadline and decision scenarios add to the harness: waiting workflows, and a
record of every outcome an approval or task was given.

The record is the test's own: a trigger on ``approvals`` and ``tasks`` in the scenario's
database writes one row per update of either table, so that an approval expired twice
(or decided, then expired) shows as two rows even though the last status looks right.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from govflow.schemas.events import Event, new_event

# One workflow per entity type, each waiting on a deadline of its own (2, 3 and 5 s), each
# with an on_expired branch; steps after the wait run only if it was approved or done.
DEADLINE_WORKFLOWS = (
    """
name: approve-within-2s
entity: policy
trigger: create
actions:
  - create_approval:
      approvers: [compliance-officer]
      due_in: 2s
      wait: true
      on_approved: [{assign: {assignee: publisher}}]
      on_expired:
        - assign: {assignee: risk-committee}
        - create_task: {title: "Chase {data.title}"}
  - assign: {assignee: publisher}
""",
    """
name: evidence-within-3s
entity: evidence
trigger: create
actions:
  - create_task:
      title: "Attach {data.title}"
      due_in: 3s
      wait: true
      on_expired: [{assign: {assignee: auditor}}]
  - assign: {assignee: reviewer}
""",
    """
name: quorum-within-5s
entity: assessment
trigger: create
actions:
  - assign: {assignee: assessor}
  - create_approval:
      approvers: [ciso, cfo]
      required: all
      due_in: 5s
      wait: true
      on_rejected: [{assign: {assignee: rework}}]
      on_expired: [{assign: {assignee: board}}]
  - create_task: {title: "Publish {data.title}"}
""",
)
ENTITY_OF = (("policy", "approve-within-2s"), ("evidence", "evidence-within-3s"),
             ("assessment", "quorum-within-5s"))  # fmt: skip
LONGEST_DUE_S = 5.0

_AUDIT = """
CREATE TABLE fault_outcomes (
    kind text NOT NULL, id uuid NOT NULL, old text NOT NULL, new text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION fault_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fault_outcomes (kind, id, old, new) VALUES (TG_TABLE_NAME, NEW.id, OLD.status, NEW.status);
    RETURN NULL;
END $$;
CREATE TRIGGER fault_outcome AFTER UPDATE ON approvals FOR EACH ROW EXECUTE FUNCTION fault_outcome();
CREATE TRIGGER fault_outcome AFTER UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION fault_outcome();
"""


def deadline_events(n: int, tag: str) -> tuple[list[Event], dict[str, frozenset[str]]]:
    """``n`` events, a third of each entity type, and the one workflow each must run."""
    events: list[Event] = []
    wants: dict[str, frozenset[str]] = {}
    for i in range(n):
        entity, workflow = ENTITY_OF[i % len(ENTITY_OF)]
        event = new_event(f"{entity}.created", f"{entity[:3].upper()}-{tag}-{i}",
                          data={"title": f"{entity} {i}"})  # fmt: skip
        events.append(event)
        wants[event.id] = frozenset({workflow})
    return events, wants


async def record_outcomes(database_url: str) -> None:
    """Install the record of every update to an approval or a task."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(_AUDIT.encode())


async def outcome_problems(database_url: str, expected: dict[str, str] | None = None) -> list[str]:
    """Every approval and task that waited got exactly one outcome, from its open status.

    Args:
        expected: the outcome each must have got, by kind (``approvals``, ``tasks``);
            None: any outcome.
    """
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT 'approvals', id::text, status FROM approvals WHERE wait UNION ALL"
            " SELECT 'tasks', id::text, status FROM tasks WHERE wait"
        )
        rows = await cur.fetchall()
        cur = await conn.execute("SELECT kind, id::text, old, new FROM fault_outcomes")
        updates = await cur.fetchall()
    per_id = Counter(row[1] for row in updates)
    changes = {row[1]: (row[2], row[3]) for row in updates}
    problems = []
    for kind, item, status in rows:
        if per_id[item] != 1:
            problems.append(f"{kind} {item} was updated {per_id[item]} times")
        elif changes[item][0] not in ("pending", "open") or changes[item][1] != status:
            problems.append(f"{kind} {item} went {changes[item]}, and is {status}")
        if expected is not None and status != expected[kind]:
            problems.append(f"{kind} {item} is {status}, expected {expected[kind]}")
    return problems


async def open_deadlines(database_url: str) -> tuple[int, float]:
    """How many deadlines are open and not yet due, and the seconds until the last is."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*), coalesce(extract(epoch FROM max(due_at) - now()), 0) FROM"
            " (SELECT due_at FROM approvals WHERE status = 'pending' AND due_at > now()"
            " UNION ALL SELECT due_at FROM tasks WHERE status = 'open' AND due_at > now()) d"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), float(row[1])


async def due_between(database_url: str, since: datetime) -> int:
    """How many deadlines fell due from ``since`` (Postgres's clock) until now."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM (SELECT due_at FROM approvals WHERE wait UNION ALL"
            " SELECT due_at FROM tasks WHERE wait) d WHERE due_at > %s AND due_at <= now()",
            (since,),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def database_now(database_url: str) -> datetime:
    """Postgres's clock, which the due times are on."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT clock_timestamp()")
        row = await cur.fetchone()
    assert row is not None
    now: datetime = row[0]
    return now


def logged(logs: Path, event: str, field: str) -> int:
    """The sum of ``field`` over the workers' ``event`` log lines, in every log.

    A worker SIGKILLed between a commit and its log line never says so: for
    ``deadlines.fired``, this counts at most what fired, so more than there were
    deadlines means one fired twice.
    """
    total = 0
    for log in logs.glob("worker-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if f'"{event}"' in line:
                record: dict[str, Any] = json.loads(line)
                total += int(record.get(field, 0))
    return total
