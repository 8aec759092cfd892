"""The invariant checker: what govflow's guarantees (README.md) mean, read back from the servers.

It trusts nothing of govflow's own code or schema: it reads the tables and the streams with
its own queries and compares them with what the test says it published. Given the
events Redis accepted and the workflows each one must run:

- every accepted event has exactly one execution per matching workflow, and no other;
- every execution is terminal: completed, or dead-lettered only where the test expects;
- every completed step's effect exists exactly once, in its action's table, and no effect
  exists without its completed step (effect and status commit together);
- a completed execution ran exactly the steps on its path: where a step waits for a person,
  the branch of the approval's or task's outcome, then the remaining actions only after
  ``approved`` or ``done``; none of its waits is still undecided;
- no entry is pending in either group, none is left undelivered, nothing is in a retry set;
- the open dead letters are exactly what the test expects, each with a reason, and the
  dead-letter stream holds one entry per letter (a replayed or purged letter keeps its
  entry there, as history);
- a webhook, when the test recorded deliveries, reached its receiver at least once for
  every notification recorded, always with the same body under one ``Idempotency-Key``.

``lost`` counts work that should exist and does not (an execution missing, or never
finished, an effect missing); ``duplicated`` counts work that exists more than once. Redeliveries (an execution tried twice, a webhook delivered twice)
are at-least-once delivery doing its job, and are counted apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from psycopg import AsyncConnection
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from govflow.schemas.keys import Keys

# The table each built-in action writes its one row per (execution_id, step) to.
EFFECT_TABLE = {
    "create_approval": "approvals",
    "create_task": "tasks",
    "assign": "assignments",
    "notify": "notifications",
    "change_status": "status_changes",
}
GROUPS = (("events", "triggers"), ("commands", "actions"))
# A waiting step's branches in the order their steps are numbered, and the outcome of each.
BRANCHES = (("on_approved", "approved"), ("on_rejected", "rejected"), ("on_expired", "expired"))
GO_ON = frozenset({"approved", "done"})  # outcomes after which the remaining actions run
MAX_LISTED = 20  # problems of one kind listed one by one; the rest are counted


class Expected(msgspec.Struct, kw_only=True):
    """What the test published, and what it expects to become of it.

    ``workflows`` maps every event id Redis accepted to the names of the workflows that
    event must run (an empty set: it matches none). ``dead`` names the (event id,
    workflow) executions expected to end dead-lettered; ``bad_entries`` counts the events
    stream entries that are not events and must be dead-lettered.
    """

    workflows: dict[str, frozenset[str]]
    dead: frozenset[tuple[str, str]] = frozenset()
    bad_entries: int = 0


class Report(msgspec.Struct, kw_only=True):
    """What the checker found."""

    problems: list[str]
    lost: int = 0
    duplicated: int = 0
    executions: int = 0
    effects: int = 0
    # Executions delivered more than once (attempts > 1), beyond the deliveries that
    # resume them after a wait.
    redelivered: int = 0
    webhook_redeliveries: int = 0  # deliveries beyond the first of one Idempotency-Key

    @property
    def ok(self) -> bool:
        """Whether every invariant holds."""
        return not self.problems

    def summary(self) -> str:
        """One paragraph for an assertion message."""
        head = (
            f"lost={self.lost} duplicated={self.duplicated} executions={self.executions}"
            f" effects={self.effects} redelivered={self.redelivered}"
        )
        return "\n".join([head, *self.problems])


class _Problems:
    """Problems grouped by kind, so that a thousand lost events make one readable line."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = {}

    def add(self, kind: str, detail: str) -> None:
        self.by_kind.setdefault(kind, []).append(detail)

    def lines(self) -> list[str]:
        out = []
        for kind, details in self.by_kind.items():
            shown = "; ".join(details[:MAX_LISTED])
            more = f" (and {len(details) - MAX_LISTED} more)" if len(details) > MAX_LISTED else ""
            out.append(f"{kind} x{len(details)}: {shown}{more}")
        return out


async def _rows(conn: AsyncConnection[Any], query: str) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query.encode())
    return list(await cur.fetchall())


async def check(
    redis: Redis,
    conn: AsyncConnection[Any],
    keys: Keys,
    expected: Expected,
    deliveries: Mapping[str, Sequence[bytes]] | None = None,
) -> Report:
    """Check every invariant; the report lists each broken one.

    Args:
        redis: a client of the deployment's Redis (replies as bytes).
        conn: a connection to its database (autocommit, or a fresh transaction).
        keys: the deployment's key names.
        expected: what was published and what must become of it.
        deliveries: the bodies a webhook receiver got, by ``Idempotency-Key``, when the
            scenario has webhooks.
    """
    found = _Problems()
    report = Report(problems=[])
    executions = await _check_executions(conn, expected, found, report)
    await _check_effects(conn, executions, found, report)
    await _check_dead_letters(redis, conn, keys, expected, executions, found)
    await _check_streams(redis, keys, found)
    if deliveries is not None:
        await _check_webhooks(conn, deliveries, found, report)
    report.problems = found.lines()
    return report


async def _check_executions(
    conn: AsyncConnection[Any], expected: Expected, found: _Problems, report: Report
) -> dict[str, tuple[str, str, str]]:
    """Executions against the events; return {execution id: (event, workflow, status)}."""
    rows = await _rows(
        conn,
        # A wait that got its outcome resumes its execution: one more delivery, by design.
        "SELECT id::text, event_id, workflow_name, status, attempts"
        " - (SELECT count(*) FROM approvals a WHERE a.execution_id = e.id AND a.wait"
        " AND a.status <> 'pending') - (SELECT count(*) FROM tasks t"
        " WHERE t.execution_id = e.id AND t.wait AND t.status <> 'open')"
        " FROM workflow_executions e",
    )
    report.executions = len(rows)
    report.redelivered = sum(1 for row in rows if row[4] > 1)
    per_pair = Counter((event_id, workflow) for _, event_id, workflow, _, _ in rows)
    wanted = {(e, w) for e, names in expected.workflows.items() for w in names}
    for pair, n in per_pair.items():
        if n > 1:
            found.add("duplicate executions", f"event {pair[0]} ran {pair[1]} {n} times")
            report.duplicated += n - 1
    for event_id, workflow in sorted(wanted - per_pair.keys()):
        found.add("lost executions", f"event {event_id} never ran {workflow}")
        report.lost += 1
    for event_id, workflow in sorted(per_pair.keys() - wanted):
        found.add("unexpected executions", f"event {event_id} ran {workflow}")
        report.duplicated += 1
    executions: dict[str, tuple[str, str, str]] = {}
    for exec_id, event_id, workflow, status, _ in rows:
        executions[exec_id] = (event_id, workflow, status)
        must = "dead_lettered" if (event_id, workflow) in expected.dead else "completed"
        if status == must:
            continue
        if status in ("completed", "dead_lettered"):
            found.add(
                "executions in the wrong terminal status",
                f"{workflow} for event {event_id} is {status}, expected {must}",
            )
            continue
        # Never finished: its steps did not all happen, which is work lost.
        found.add("executions not terminal", f"{workflow} for event {event_id} is {status}")
        report.lost += 1
    return executions


async def _check_effects(
    conn: AsyncConnection[Any],
    executions: dict[str, tuple[str, str, str]],
    found: _Problems,
    report: Report,
) -> None:
    """Each step on an execution's path is done, with its one effect row; nothing else is."""
    definitions = {
        (name, version): Steps(actions)
        for name, version, actions in await _rows(
            conn, "SELECT name, version, definition -> 'actions' FROM workflows"
        )
    }
    steps_of: dict[str, Steps] = {}
    for exec_id, name, version in await _rows(
        conn, "SELECT id::text, workflow_name, workflow_version FROM workflow_executions"
    ):
        steps_of[exec_id] = definitions.get((name, version), Steps([]))
    completed = {
        (exec_id, step): action
        for exec_id, step, action in await _rows(
            conn,
            "SELECT execution_id::text, step, action FROM execution_steps"
            " WHERE status = 'completed'",
        )
    }
    outcomes: dict[str, dict[int, str]] = {}
    for exec_id, step, status in await _rows(
        conn,
        "SELECT execution_id::text, step, status FROM approvals WHERE wait UNION ALL"
        " SELECT execution_id::text, step, status FROM tasks WHERE wait",
    ):
        outcomes.setdefault(exec_id, {})[step] = status
    effects: Counter[tuple[str, str, int]] = Counter()
    for table in sorted(set(EFFECT_TABLE.values())):
        for exec_id, step in await _rows(conn, f"SELECT execution_id::text, step FROM {table}"):
            effects[(table, exec_id, step)] += 1
    report.effects = sum(effects.values())

    should: set[tuple[str, str, int]] = set()
    for exec_id, (_, _, status) in executions.items():
        steps = steps_of.get(exec_id, Steps([]))
        if status == "completed":
            path, undecided = steps.path(outcomes.get(exec_id, {}))
            for step in undecided:
                found.add("completed executions still waiting", f"{exec_id} step {step}")
                report.lost += 1
            for step in path:
                if (exec_id, step) not in completed:
                    found.add("completed executions with a step not done", f"{exec_id} step {step}")
                    report.lost += 1
            for step in sorted(steps.action.keys() - path):
                if (exec_id, step) in completed:
                    found.add("steps done off the execution's path", f"{exec_id} step {step}")
                    report.duplicated += 1
        for step, action in steps.action.items():
            effect_table = EFFECT_TABLE.get(action)
            if (exec_id, step) in completed and effect_table is not None:
                should.add((effect_table, exec_id, step))
    for key, n in effects.items():
        if n > 1:
            found.add("effects written twice", f"{key[0]} {key[1]} step {key[2]} x{n}")
            report.duplicated += n - 1
    for table, exec_id, step in sorted(should - effects.keys()):
        found.add("lost effects", f"{table} {exec_id} step {step}")
        report.lost += 1
    for table, exec_id, step in sorted(effects.keys() - should):
        found.add("effects without their completed step", f"{table} {exec_id} step {step}")
    for event_id, n in await _rows(
        conn,
        "SELECT event ->> 'id', count(*) FROM outbox GROUP BY 1 HAVING count(*) > 1",
    ):
        found.add("chained events written twice", f"{event_id} x{n}")
        report.duplicated += n - 1


class Steps:
    """A definition's steps as README.md numbers them, and the path an execution takes.

    The actions are steps 1..N; the steps of their branches follow, N+1 onwards: for each
    action in order, its ``on_approved``, then ``on_rejected``, then ``on_expired`` steps.
    After a step that waits, the branch of its outcome runs; after ``approved`` or
    ``done`` the remaining actions run too, after any other outcome nothing more.
    """

    def __init__(self, actions: list[dict[str, dict[str, Any]]]) -> None:
        self.action: dict[int, str] = {}
        self.main: list[tuple[int, bool]] = []  # (step, whether it waits)
        self.branches: dict[tuple[int, str], list[int]] = {}
        for number, raw in enumerate(actions, start=1):
            ((name, params),) = raw.items()
            self.action[number] = name
            self.main.append((number, bool(params.get("wait"))))
        for owner, raw in enumerate(actions, start=1):
            ((_, params),) = raw.items()
            for key, outcome in BRANCHES:
                for step in params.get(key, []):
                    number = len(self.action) + 1
                    self.action[number] = next(iter(step))
                    self.branches.setdefault((owner, outcome), []).append(number)

    def path(self, outcomes: Mapping[int, str]) -> tuple[set[int], list[int]]:
        """The steps a finished execution ran, and the waits it finished without an outcome."""
        path: set[int] = set()
        for step, waits in self.main:
            path.add(step)
            if not waits:
                continue
            outcome = outcomes.get(step)
            if outcome is None or outcome in ("pending", "open"):
                return path, [step]
            path.update(self.branches.get((step, outcome), []))
            if outcome not in GO_ON:
                break
        return path, []


async def _check_dead_letters(
    redis: Redis,
    conn: AsyncConnection[Any],
    keys: Keys,
    expected: Expected,
    executions: dict[str, tuple[str, str, str]],
    found: _Problems,
) -> None:
    """The open dead letters are exactly the expected ones; the stream holds every letter."""
    letters = await _rows(
        conn,
        "SELECT stream, message_id, error, execution_id::text,"
        " replayed_at IS NULL AND purged_at IS NULL FROM dead_letters",
    )
    bad_entries = 0
    dead_execs: Counter[str] = Counter()
    for stream, message_id, error, exec_id, still_open in letters:
        if not (error or "").strip():
            found.add("dead letters without a reason", f"{stream} {message_id}")
        if not still_open:
            continue  # an operator replayed or purged it: no longer dead
        if exec_id is None:
            bad_entries += 1
            continue
        dead_execs[exec_id] += 1
        event_id, workflow, _ = executions.get(exec_id, ("?", "?", "?"))
        if (event_id, workflow) not in expected.dead:
            found.add("unexpected dead letters", f"{workflow} for event {event_id}: {error}")
    if bad_entries != expected.bad_entries:
        found.add(
            "dead-lettered entries that are not events",
            f"{bad_entries} in the table, expected {expected.bad_entries}",
        )
    for exec_id, (event_id, workflow, _) in executions.items():
        if (event_id, workflow) in expected.dead and dead_execs[exec_id] != 1:
            found.add(
                "dead-lettered executions without one dead letter",
                f"{workflow} for event {event_id}: {dead_execs[exec_id]}",
            )
    recorded = {(stream, message_id) for stream, message_id, *_ in letters}
    on_stream: Counter[tuple[str, str]] = Counter()
    for p in keys.all_partitions():
        entries: Any = await redis.xrange(keys.dead(p))
        for _, fields in entries:
            origin = (
                fields.get(b"stream", b"?").decode(),
                fields.get(b"message_id", b"?").decode(),
            )
            on_stream[origin] += 1
            if not fields.get(b"error"):
                found.add("dead-letter stream entries without a reason", f"{origin}")
    for origin, n in on_stream.items():
        if n > 1:
            found.add("entries dead-lettered twice", f"{origin} x{n}")
    for origin in sorted(on_stream.keys() - recorded):
        found.add("dead-letter stream entries not in the table", f"{origin}")
    for origin in sorted(recorded - on_stream.keys()):
        found.add("dead letters not on the dead-letter stream", f"{origin}")


async def _check_streams(redis: Redis, keys: Keys, found: _Problems) -> None:
    """Nothing pending, nothing undelivered, nothing waiting for a retry."""
    for p in keys.all_partitions():
        for role, group in GROUPS:
            stream = keys.stream(role, p)  # type: ignore[arg-type]
            try:
                summary = await redis.xpending(stream, group)
                groups = await redis.xinfo_groups(stream)
            except redis_errors.ResponseError:
                continue  # no stream or no group: nothing was ever published to it
            if summary["pending"]:
                found.add("entries left pending", f"{summary['pending']} in {stream} {group}")
            for info in groups:
                if info["name"].decode() != group:
                    continue
                last = info["last-delivered-id"].decode()
                after = await redis.xrange(stream, min=f"({last}", max="+", count=1)
                if after:
                    found.add("entries never delivered", f"{stream} {group} after {last}")
        scheduled = await redis.zcard(keys.retry(p))
        if scheduled:
            found.add("retries still scheduled", f"{scheduled} in {keys.retry(p)}")


async def _check_webhooks(
    conn: AsyncConnection[Any],
    deliveries: Mapping[str, Sequence[bytes]],
    found: _Problems,
    report: Report,
) -> None:
    """Every recorded notification was delivered; one key always carried one body."""
    recorded = {key for (key,) in await _rows(conn, "SELECT idempotency_key FROM notifications")}
    for key in sorted(recorded - deliveries.keys()):
        found.add("notifications recorded but never delivered", key)
        report.lost += 1
    for key, bodies in deliveries.items():
        report.webhook_redeliveries += len(bodies) - 1
        if len(set(bodies)) > 1:
            found.add("one Idempotency-Key with different bodies", key)
