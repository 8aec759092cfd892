"""The pipeline's guarantees, end to end, against real Redis and Postgres.

Each test applies workflow definitions, publishes events with the library, runs a real
``Worker`` (or ``govflow run`` as a subprocess) and checks the rows in Postgres and what
is left in Redis. The guarantees are listed in README.md, "Guarantees".
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest
import structlog
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db.dead_letters import Selection
from govflow.operations import dlq
from govflow.schemas.codec import encode
from govflow.schemas.commands import RunWorkflow, execution_id
from govflow.schemas.events import Change, Event, new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.pipeline_helpers import (
    add_entry,
    apply,
    effect_counts,
    effect_problems,
    entries,
    fetch,
    group_lag,
    publish,
    running_worker,
    scalar,
    statuses,
    stream_state,
    wait_for,
    wait_settled,
)
from tests.webhook_server import Reply, serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HIGH_RISK = """
name: high-risk-review
entity: policy
trigger: create
when:
  - field: risk
    in: [high, critical]
actions:
  - create_approval: {approvers: [compliance-officer], due_in_days: 5}
  - create_task: {title: "Review {data.title}", assignee: "{data.owner}"}
  - assign: {assignee: risk-team}
"""
EVIDENCE_INTAKE = """
name: evidence-intake
entity: evidence
trigger: create
actions:
  - create_task: {title: "File {data.title}"}
"""
NOTHING_LEFT = {"triggers_pending": 0, "actions_pending": 0, "retry_scheduled": 0, "dead_stream": 0}


@pytest.fixture
def any_settings(make_settings: Any, any_redis_url: str) -> Settings:
    """Settings on the Redis of ``any_redis_url``."""
    settings: Settings = make_settings(redis_url=any_redis_url)
    return settings


def policy_created(i: int, risk: str, **kwargs: Any) -> Event:
    return new_event(
        "policy.created",
        f"POL-{i}",
        tenant="acme",
        data={"title": f"Policy {i}", "risk": risk, "owner": f"user-{i % 7}"},
        **kwargs,
    )


# 1 and 10 ------------------------------------------------------------------------------


async def test_a_thousand_events_each_run_once_with_one_effect_per_step(
    any_settings: Settings, any_redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    await apply(pool, HIGH_RISK)
    await apply(pool, EVIDENCE_INTAKE)
    keys = Keys(any_settings.prefix)
    events: list[Event] = []
    matching: dict[str, str] = {}  # event id -> workflow it must start
    for i in range(1000):
        match i % 4:
            case 0:
                event = policy_created(i, "high" if i % 8 == 0 else "critical")
                matching[event.id] = "high-risk-review"
            case 1:
                event = policy_created(i, "low")  # fails the `when`
            case 2:
                event = new_event("evidence.created", f"EV-{i}", data={"title": f"Scan {i}"})
                matching[event.id] = "evidence-intake"
            case _:
                # Right entity and data, wrong trigger.
                event = new_event(
                    "policy.updated",
                    f"POL-{i}",
                    data={"title": f"Policy {i}", "risk": "high"},
                    changes={"risk": Change(from_="low", to="high")},
                )
        events.append(event)

    started = time.perf_counter()
    async with running_worker(any_settings):
        await publish(any_redis, keys, events)
        await wait_settled(pool, len(matching), within=60)
    elapsed = time.perf_counter() - started

    runs = await fetch(pool, "SELECT event_id, workflow_name, attempts FROM workflow_executions")
    assert {e: w for e, w, _ in runs} == matching  # every match ran, nothing else did
    assert {a for _, _, a in runs} == {1}
    assert await effect_problems(pool) == []
    assert await effect_counts(pool) == {
        "approvals": 250, "assignments": 250, "notifications": 0, "status_changes": 0,
        "tasks": 500,
    }  # fmt: skip
    titles = await fetch(pool, "SELECT entity_id, title, assignee FROM tasks WHERE step = 2")
    assert all(
        t == f"Review Policy {e[4:]}" and a == f"user-{int(e[4:]) % 7}" for e, t, a in titles
    )
    assert await scalar(pool, "SELECT count(*) FROM execution_steps WHERE attempts <> 1") == 0
    assert await stream_state(any_redis, keys) == NOTHING_LEFT
    print(f"\n1,000 events, {len(matching)} executions: {elapsed:.2f}s")  # the report's timing


# 3 and 10 ------------------------------------------------------------------------------


def wire(event: Event, **changes: Any) -> dict[str, Any]:
    """An event as the JSON object on the wire, with some fields changed or removed."""
    raw: dict[str, Any] = json.loads(encode(event))
    for field, value in changes.items():
        if value is DROP:
            del raw[field]
        else:
            raw[field] = value
    return raw


DROP = object()


def poison_entries() -> dict[str, tuple[dict[bytes, bytes], str]]:
    """Entries of the events stream that are not events: fields, and what the reason says."""
    good = policy_created(0, "high")

    def entry(raw: dict[str, Any]) -> dict[bytes, bytes]:
        return {b"event": json.dumps(raw).encode()}

    utf8 = json.dumps(wire(good, id="bad-utf8")).encode().replace(b"Policy 0", b"Policy \xff\xfe")
    return {
        "not json": ({b"event": b"{this is not json"}, "not valid JSON"),
        "missing field": (entry(wire(good, tenant=DROP)), "missing required field `tenant`"),
        "wrong type": (entry(wire(good, entity_id=42)), "`$.entity_id`"),
        "unknown type": (entry(wire(good, type="policy.exploded")), "`$.type`"),
        # The reason quotes the value: a NUL in it must not stop the dead letter's insert.
        "unknown type with NUL": (entry(wire(good, type="policy.\x00")), "`$.type`"),
        # Valid JSON, but Postgres text cannot hold NUL: refused before it reaches a batch.
        "NUL in entity_id": (entry(wire(good, entity_id="POL-\x00")), "`$.entity_id`"),
        "too large": (
            entry(wire(good, data={"blob": "x" * (300 * 1024)})),
            "over the 262144 byte limit",
        ),
        "no event field": ({b"payload": json.dumps(wire(good)).encode()}, "no `event` field"),
        "not utf-8": ({b"event": utf8}, "UTF-8"),
        "empty": ({b"event": b""}, "not valid JSON"),
    }


async def test_poison_is_dead_lettered_with_its_reason_and_the_group_keeps_flowing(
    any_settings: Settings, any_redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    await apply(pool, HIGH_RISK)
    keys = Keys(any_settings.prefix)
    poison = poison_entries()
    # (stream, entry id) -> (kind, what the reason must say); ids repeat across streams.
    reason_of: dict[tuple[str, str], tuple[str, str]] = {}
    for kind, (fields, words) in poison.items():
        reason_of[(keys.events(), await add_entry(any_redis, keys.events(), fields))] = (
            kind,
            words,
        )
    # A poison command of each kind on the commands stream.
    ghost = new_event("policy.created", "POL-ghost", data={"risk": "high"})
    ghost_command = RunWorkflow(
        execution_id=execution_id(ghost.tenant, ghost.id, "high-risk-review"),
        workflow_name="high-risk-review",
        workflow_version=1,
        event=ghost,
    )
    command_poison = {
        "command not json": ({b"command": b"\x00\x01"}, "not valid JSON"),
        "no command field": ({b"event": b"{}"}, "no `command` field"),
        "command not a command": ({b"command": b'{"command": "explode"}'}, "invalid command"),
        "no execution row": ({b"command": encode(ghost_command)}, "execution row does not exist"),
        "execution id not a uuid": (
            {b"command": encode(msgspec.structs.replace(ghost_command, execution_id="E-1"))},
            "execution_id",
        ),
    }
    for kind, (fields, words) in command_poison.items():
        entry_id = await add_entry(any_redis, keys.commands(), fields)
        reason_of[(keys.commands(), entry_id)] = (kind, words)
    # Published before the worker starts: good events share a batch with every poison.
    good = [policy_created(i, "high") for i in range(1, 41)]
    await publish(any_redis, keys, good)

    async with running_worker(any_settings):
        await wait_settled(pool, len(good), within=30)
        await wait_for(
            lambda: stream_state(any_redis, keys),
            lambda s: s["dead_stream"] == len(reason_of),
            within=20,
            what="every poison entry on the dead-letter stream",
        )

    assert await effect_problems(pool) == []
    # No good event was retried for its poison batch-mates' sake.
    assert await scalar(pool, "SELECT max(attempts) FROM workflow_executions") == 1
    assert not [f for _, f in await entries(any_redis, keys.events()) if b"attempt" in f]
    letters = {
        (stream, message_id): (error, attempts)
        for stream, message_id, error, attempts in await fetch(
            pool, "SELECT stream, message_id, error, attempts FROM dead_letters"
        )
    }
    assert set(letters) == set(reason_of)
    for where, (kind, words) in reason_of.items():
        error, attempts = letters[where]
        assert words in error, f"{kind}: {error!r} does not say {words!r}"
        assert attempts == 1, f"{kind} was tried {attempts} times before it was dead-lettered"
    dead = await entries(any_redis, keys.dead())
    on_dead_stream = {(f[b"stream"].decode(), f[b"message_id"].decode()): f for _, f in dead}
    assert len(dead) == len(on_dead_stream) == len(reason_of)
    assert set(on_dead_stream) == set(reason_of)
    for where, fields in on_dead_stream.items():
        kind, words = reason_of[where]
        assert words in fields[b"error"].decode(), kind
    state = await stream_state(any_redis, keys)
    assert state == {**NOTHING_LEFT, "dead_stream": len(reason_of)}


# 2 -------------------------------------------------------------------------------------


async def test_a_duplicate_event_runs_each_workflow_once(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    await apply(pool, HIGH_RISK)
    await apply(pool, HIGH_RISK.replace("high-risk-review", "high-risk-audit"))
    keys = Keys(settings.prefix)
    twice = policy_created(1, "high")  # two copies in one batch
    apart = policy_created(2, "high")  # two copies in different batches
    later = policy_created(3, "high")  # published again after it completed
    filler = [policy_created(100 + i, "low") for i in range(300)]  # matches nothing
    await publish(redis, keys, [twice, twice, apart, *filler, apart])

    async with running_worker(settings):
        await publish(redis, keys, [later])
        await wait_settled(pool, 6, within=30)
        commands = await redis.xlen(keys.commands())
        await publish(redis, keys, [later, twice])
        await wait_for(
            lambda: group_lag(redis, keys.events(), "triggers"),
            lambda lag: lag == 0,
            within=10,
            what="the republished events to be delivered",
        )
        await wait_for(
            lambda: stream_state(redis, keys),
            lambda s: s == NOTHING_LEFT,
            within=10,
            what="the republished events to be acknowledged",
        )
        # A completed execution is not commanded again.
        assert await redis.xlen(keys.commands()) == commands

    runs = await fetch(
        pool, "SELECT event_id, workflow_name FROM workflow_executions ORDER BY 1, 2"
    )
    assert runs == sorted(
        (e.id, w) for e in (twice, apart, later) for w in ("high-risk-audit", "high-risk-review")
    )
    assert await statuses(pool) == {"completed": 6}
    assert await effect_problems(pool) == []
    assert await effect_counts(pool) == {
        "approvals": 6, "assignments": 6, "notifications": 0, "status_changes": 0, "tasks": 6,
    }  # fmt: skip


async def test_two_commands_for_one_execution_in_one_batch_run_its_steps_once(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    """The matcher emits a command again for a row still queued (a duplicate event, a
    redelivery after a crash), so the actions group can get one execution twice in a batch."""
    keys = Keys(settings.prefix)
    with serve() as webhook:
        await apply(pool, ALWAYS_DOWN.replace("URL", webhook.plan("/hook", Reply(200))))
        async with running_worker(settings, frozenset({"triggers"})):
            await publish(redis, keys, [policy_created(1, "high")])
            await wait_for(
                lambda: redis.xlen(keys.commands()),
                lambda n: n == 1,
                within=10,
                what="the command emitted",
            )
        ((_, command),) = await entries(redis, keys.commands())
        await add_entry(redis, keys.commands(), command)  # the same command, again

        async with running_worker(settings, frozenset({"actions"})):
            await wait_settled(pool, 1, within=20)
            await wait_for(
                lambda: stream_state(redis, keys),
                lambda s: s == NOTHING_LEFT,
                within=10,
                what="both commands acknowledged",
            )
        assert len(webhook.requests_to("/hook")) == 1
    steps = "SELECT step, status, attempts FROM execution_steps ORDER BY step"
    assert await fetch(pool, steps) == [
        (1, "completed", 1),
        (2, "completed", 1),
        (3, "completed", 1),
    ]
    assert await effect_problems(pool) == []


# 5, 10 and 11 --------------------------------------------------------------------------

ALWAYS_DOWN = """
name: notify-risk
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - notify: {webhook: "URL", message: "{data.title} changed"}
  - assign: {assignee: risk-team}
"""


async def replay(redis: Redis, pool: AsyncConnectionPool[Any], keys: Keys, letter_id: int) -> None:
    """Replay one dead letter as ``govflow dlq replay ID`` does."""
    report = await dlq.replay(
        redis, pool, keys, Selection(ids=(letter_id,)), actor="test", reason="receiver fixed"
    )
    assert [r.id for r in report.replayed] == [letter_id]


async def test_attempts_exhausted_then_replay_finishes_without_repeating_a_step(
    make_settings: Any,
    any_redis_url: str,
    any_redis: Redis,
    pool: AsyncConnectionPool[Any],
) -> None:
    settings = make_settings(redis_url=any_redis_url, max_attempts=3, webhook_secret="k")
    keys = Keys(settings.prefix)
    with serve() as webhook:
        url = webhook.plan("/down", Reply(500))
        await apply(pool, ALWAYS_DOWN.replace("URL", url))
        event = policy_created(1, "high")
        exec_id = execution_id(event.tenant, event.id, "notify-risk")

        with structlog.testing.capture_logs() as logs:
            async with running_worker(settings):
                await publish(any_redis, keys, [event])
                await wait_settled(pool, 1, status="dead_lettered", within=20)
                await wait_for(
                    lambda: stream_state(any_redis, keys),
                    lambda s: s == {**NOTHING_LEFT, "dead_stream": 1},
                    within=10,
                    what="the dead letter handed over",
                )

        assert len(webhook.requests_to("/down")) == 3
        ((status, attempts, last_error),) = await fetch(
            pool, "SELECT status, attempts, last_error FROM workflow_executions"
        )
        assert (status, attempts) == ("dead_lettered", 3)
        assert "500" in last_error
        assert "attempt 3 of 3" in last_error
        ((letter_id, message_id, stream, error, letter_attempts, letter_exec),) = await fetch(
            pool,
            "SELECT id, message_id, stream, error, attempts, execution_id::text FROM dead_letters",
        )
        assert (stream, letter_attempts, letter_exec) == (keys.commands(), 3, exec_id)
        assert error == last_error
        steps = "SELECT step, status, attempts FROM execution_steps ORDER BY step"
        assert await fetch(pool, steps) == [(1, "completed", 1), (2, "failed", 3)]

        # 11: where the entry went, and why, is logged once per delivery.
        ends = [e for e in logs if e["event"].startswith("entry.") and e["stream"] == stream]
        assert [(e["event"], e["attempt"]) for e in ends] == [
            ("entry.retried", 1), ("entry.retried", 2), ("entry.dead_lettered", 3),
        ]  # fmt: skip
        dead = ends[-1]
        assert dead["entry_id"] == message_id
        assert dead["reason"] == error
        assert (dead["execution_id"], dead["event_id"]) == (exec_id, event.id)

        # The receiver is fixed; the operator replays the dead letter.
        webhook.plan("/down", Reply(200))
        async with running_worker(settings):
            await replay(any_redis, pool, keys, letter_id)
            await wait_settled(pool, 1, within=20)
            await wait_for(
                lambda: stream_state(any_redis, keys),
                lambda s: s == {**NOTHING_LEFT, "dead_stream": 1},
                within=10,
                what="the replay acknowledged",
            )

        sent = webhook.requests_to("/down")
        assert len(sent) == 4
        assert {r.headers.get("Idempotency-Key") for r in sent} == {f"{exec_id}:2"}
    # The task of step 1 was not created again; the webhook step and the rest completed.
    assert await fetch(pool, steps) == [
        (1, "completed", 1),
        (2, "completed", 4),
        (3, "completed", 1),
    ]
    assert await effect_problems(pool) == []
    assert await effect_counts(pool) == {
        "approvals": 0, "assignments": 1, "notifications": 1, "status_changes": 0, "tasks": 1,
    }  # fmt: skip
    # The letter stays, marked replayed; the replay made no second one.
    assert await fetch(
        pool, "SELECT replayed_by, replay_reason, replay_count FROM dead_letters"
    ) == [("test", "receiver fixed", 1)]


async def test_a_poison_entry_is_logged_once_with_where_and_why(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    keys = Keys(settings.prefix)
    entry_id = await add_entry(redis, keys.events(), {b"event": b"{oops"})
    with structlog.testing.capture_logs() as logs:
        async with running_worker(settings):
            await wait_for(
                lambda: stream_state(redis, keys),
                lambda s: s == {**NOTHING_LEFT, "dead_stream": 1},
                within=10,
                what="the poison entry dead-lettered",
            )
    about = [e for e in logs if e.get("entry_id") == entry_id]
    assert len(about) == 1
    (line,) = about
    assert line["event"] == "entry.dead_lettered"
    assert line["log_level"] == "info"
    assert (line["stream"], line["attempt"]) == (keys.events(), 1)
    assert "not valid JSON" in line["reason"]


# 9 -------------------------------------------------------------------------------------

V1 = """
name: evolving
entity: assessment
trigger: create
actions:
  - create_task: {title: "v1 {entity_id}"}
"""
V2 = """
name: evolving
entity: assessment
trigger: create
actions:
  - assign: {assignee: "v2-team"}
  - create_approval: {approvers: [auditor]}
"""


async def test_a_new_definition_version_is_used_within_seconds_without_a_restart(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    keys = Keys(settings.prefix)
    assert await apply(pool, V1) == 1

    def assessment(name: str) -> Event:
        return new_event("assessment.created", f"AS-{name}")

    async with running_worker(settings):
        await publish(redis, keys, [assessment(f"before-{i}") for i in range(20)])
        await wait_settled(pool, 20, within=20)
        assert await apply(pool, V2) == 2
        applied = time.monotonic()
        # Probe with one event at a time until an execution runs version 2.
        probes = 0

        async def probe() -> int:
            nonlocal probes
            probes += 1
            await publish(redis, keys, [assessment(f"probe-{probes}")])
            return int(
                await scalar(
                    pool, "SELECT count(*) FROM workflow_executions WHERE workflow_version = 2"
                )
            )

        # The workers re-read definitions every 2 s: "within seconds", with room for a slow CI.
        await wait_for(probe, lambda n: n > 0, within=6, every=0.25, what="version 2 in use")
        seen_after = time.monotonic() - applied
        # From now on every new event runs version 2.
        await publish(redis, keys, [assessment(f"after-{i}") for i in range(20)])
        await wait_settled(pool, 20 + probes + 20, within=20)

    by_version = await fetch(
        pool,
        "SELECT split_part(entity_id, '-', 2), workflow_version, count(*)"
        " FROM workflow_executions WHERE entity_id NOT LIKE %s GROUP BY 1, 2 ORDER BY 1",
        "AS-probe-%",
    )
    assert by_version == [("after", 2, 20), ("before", 1, 20)]
    assert await effect_problems(pool) == []
    v2_runs = await scalar(
        pool, "SELECT count(*) FROM workflow_executions WHERE workflow_version = 2"
    )
    assert await effect_counts(pool) == {
        "approvals": v2_runs, "assignments": v2_runs, "notifications": 0, "status_changes": 0,
        "tasks": 20 + probes + 20 - v2_runs,
    }  # fmt: skip
    assert await fetch(pool, "SELECT DISTINCT assignee FROM assignments") == [("v2-team",)]
    print(f"\nversion 2 seen {seen_after:.2f}s after apply")


# 8 -------------------------------------------------------------------------------------

CHAIN = """
name: ping
entity: policy
trigger: status_change
actions:
  - create_task: {title: "Look at {entity_id} ({data.status})"}
  - change_status: {to: reviewed}
"""


async def test_a_workflow_chain_is_stopped_at_depth_8(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    """Each run changes the status, whose event starts the workflow again, through the outbox."""
    await apply(pool, CHAIN)
    keys = Keys(settings.prefix)
    start = new_event(
        "policy.status_changed",
        "POL-7",
        data={"status": "draft"},
        changes={"status": Change(from_=None, to="draft")},
    )
    roles = frozenset({"triggers", "actions", "relay"})
    async with running_worker(settings, roles):
        await publish(redis, keys, [start])
        await wait_for(
            lambda: statuses(pool),
            lambda s: s == {"completed": 8, "dead_lettered": 1},
            within=60,
            what="8 runs completed and the 9th dead-lettered",
        )
        await wait_for(
            lambda: scalar(pool, "SELECT count(*) FROM outbox WHERE published_at IS NULL"),
            lambda n: n == 0,
            within=10,
            what="the outbox published",
        )
        await wait_for(
            lambda: stream_state(redis, keys),
            lambda s: s == {**NOTHING_LEFT, "dead_stream": 1},
            within=10,
            what="every event and command handed over",
        )
        assert await group_lag(redis, keys.events(), "triggers") == 0

    # Nothing more is coming: the chain is 9 executions long.
    assert await scalar(pool, "SELECT count(*) FROM workflow_executions") == 9
    assert await scalar(pool, "SELECT count(*) FROM outbox") == 8
    assert await effect_problems(pool) == []
    assert await effect_counts(pool) == {
        "approvals": 0, "assignments": 0, "notifications": 0, "status_changes": 8, "tasks": 9,
    }  # fmt: skip
    ((error, payload),) = await fetch(pool, "SELECT error, payload FROM dead_letters")
    assert "chain" in error
    command = json.loads(payload["command"])
    assert command["event"]["depth"] == 8
    ((last_error,),) = await fetch(
        pool, "SELECT last_error FROM workflow_executions WHERE status = 'dead_lettered'"
    )
    assert last_error == error
    # Each chained event names the one it came from, one level deeper.
    depths = sorted(
        (row[0]["depth"], row[0]["causation_id"])
        for row in await fetch(pool, "SELECT event FROM outbox")
    )
    assert [d for d, _ in depths] == list(range(1, 9))
    assert depths[0][1] == start.id
