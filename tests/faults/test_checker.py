"""The invariant checker checks something: broken on purpose, each guarantee is reported.

A checker that passes everything would make the whole suite worthless. Here a worker
whose loop acknowledges entries before committing their work (and dies once in between,
as a crash would have it) loses events and executions, and the checker says so; then
each invariant is broken by hand, one by one, and each is reported.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import psycopg
import pytest
from redis.asyncio import Redis

from govflow.consumers.streams import Entry, Streams
from govflow.runtime.worker import Worker
from govflow.schemas.events import Event
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    PREFIX,
    apply_workflows,
    expected_of,
    in_process_worker,
    make_events,
    run_check,
    settle,
)
from tests.faults.invariants import Report
from tests.faults.receiver import receiving
from tests.faults.servers import RedisServer
from tests.faults.waits import DEADLINE_WORKFLOWS, deadline_events

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(180)]

EVENTS = 200


def worker(redis_url: str, database_url: str) -> AbstractAsyncContextManager[Worker]:
    # Several batches per group, so that a crash loses one and not everything.
    return in_process_worker(redis_url, database_url, batch_size=20)


async def publish(redis_url: str, events: list[Event]) -> None:
    from govflow.producers.publish import Publisher

    async with Publisher.from_url(redis_url, Keys(PREFIX)) as publisher:
        await publisher.publish_many(events)


async def quiet(redis_url: str, database_url: str, expected: Any) -> Report:
    """Wait until the streams are drained (whatever the tables say); return the report."""
    in_flight = ("entries left pending", "entries never delivered", "retries still scheduled")
    deadline = time.monotonic() + 60
    while True:
        report = await run_check(redis_url, database_url, expected)
        if not any(p.startswith(in_flight) for p in report.problems):
            return report
        assert time.monotonic() < deadline, report.summary()
        await anyio.sleep(0.5)


async def test_a_loop_that_acknowledges_before_committing_is_caught(
    fault_redis: RedisServer, fault_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await apply_workflows(fault_database_url)
    healthy, wants = make_events(EVENTS, "healthy")
    broken, more = make_events(EVENTS, "broken")
    wants.update(more)

    # The real loop: the checker is satisfied.
    async with worker(fault_redis.url, fault_database_url):
        await publish(fault_redis.url, healthy)
        control = await settle(
            fault_redis.url,
            fault_database_url,
            expected_of([e.id for e in healthy], wants),
            within=60,
        )
    assert control.ok, control.summary()

    # The broken loop: every batch read is acknowledged at once, before any work is
    # committed, and the first batch of each group is then lost to a "crash".
    read = Streams.read
    crashed: set[str] = set()

    async def ack_first(self: Streams, stream: str, group: str, *args: Any) -> list[Entry]:
        batch = await read(self, stream, group, *args)
        if batch:
            await self.redis.xack(stream, group, *[e.id for e in batch])
            if group not in crashed:
                crashed.add(group)
                return []  # acknowledged, never run: the worker died right here
        return batch

    monkeypatch.setattr(Streams, "read", ack_first)
    expected = expected_of([e.id for e in healthy + broken], wants)
    async with worker(fault_redis.url, fault_database_url):
        await publish(fault_redis.url, broken)
        report = await quiet(fault_redis.url, fault_database_url, expected)
    assert crashed == {"triggers", "actions"}

    assert not report.ok
    assert report.lost > 0
    kinds = {p.split(" x", 1)[0] for p in report.problems}
    # The dropped events batch: events Redis accepted that never ran their workflows.
    assert "lost executions" in kinds, report.summary()
    # The dropped commands batch: executions recorded, never run, never finished.
    assert "executions not terminal" in kinds, report.summary()
    assert "completed executions with a step not done" not in kinds
    assert report.duplicated == 0


async def test_each_broken_invariant_is_reported(
    fault_redis: RedisServer, fault_database_url: str
) -> None:
    await apply_workflows(fault_database_url)
    events, wants = make_events(50, "mutate")
    expected = expected_of([e.id for e in events], wants)
    async with worker(fault_redis.url, fault_database_url):
        await publish(fault_redis.url, events)
        report = await settle(fault_redis.url, fault_database_url, expected, within=60)
    assert report.ok, report.summary()

    keys = Keys(PREFIX)
    async with await psycopg.AsyncConnection.connect(fault_database_url, autocommit=True) as db:
        done = await db.execute(
            "SELECT id FROM workflow_executions WHERE event_id <> %s ORDER BY id LIMIT 3",
            (events[0].id,),
        )
        first, second, third = [row[0] for row in await done.fetchall()]
        # An effect lost; another written twice (once the unique key is out of the way).
        await db.execute("DELETE FROM tasks WHERE execution_id = %s", (first,))
        await db.execute("ALTER TABLE tasks DROP CONSTRAINT tasks_execution_id_step_key")
        await db.execute(
            "INSERT INTO tasks (execution_id, step, entity_id, title)"
            " SELECT execution_id, step, entity_id, title FROM tasks WHERE execution_id = %s",
            (second,),
        )
        # An execution left running; one lost; one for an event nobody published.
        await db.execute(
            "UPDATE workflow_executions SET status = 'running' WHERE id = %s", (third,)
        )
        await db.execute("DELETE FROM workflow_executions WHERE event_id = %s", (events[0].id,))
        await db.execute(
            "INSERT INTO workflow_executions (id, workflow_name, workflow_version, event_id,"
            " entity_type, entity_id, tenant, status) VALUES (gen_random_uuid(), 'review', 1,"
            " 'never-published', 'policy', 'P', 't', 'completed')"
        )
    redis = Redis.from_url(fault_redis.url)
    try:
        # An entry delivered and never acknowledged; one never delivered; a retry left
        # scheduled; a dead letter on the stream that the table does not know.
        await redis.xadd(keys.events(), {"event": b"{}"})
        await redis.xreadgroup("triggers", "ghost", {keys.events(): ">"}, count=1)
        await redis.xadd(keys.events(), {"event": b"{}"})
        await redis.zadd(keys.retry(), {b"member": 1})
        await redis.xadd(keys.dead(), {"stream": keys.events(), "message_id": "1-1"})
    finally:
        await redis.aclose()

    report = await run_check(fault_redis.url, fault_database_url, expected)
    kinds = {p.split(" x", 1)[0] for p in report.problems}
    assert kinds >= {
        "lost effects",
        "effects written twice",
        "executions not terminal",
        "lost executions",
        "unexpected executions",
        "entries left pending",
        "entries never delivered",
        "retries still scheduled",
        "dead-letter stream entries not in the table",
        "dead-letter stream entries without a reason",
    }, report.summary()
    assert report.lost >= 2
    assert report.duplicated >= 2


async def test_a_wrong_path_after_a_wait_is_reported(
    fault_redis: RedisServer, fault_database_url: str
) -> None:
    await apply_workflows(fault_database_url, DEADLINE_WORKFLOWS)
    events, wants = deadline_events(6, "path")
    expected = expected_of([e.id for e in events], wants)
    async with in_process_worker(fault_redis.url, fault_database_url, deadline_interval=0.2):
        await publish(fault_redis.url, events)
        report = await settle(fault_redis.url, fault_database_url, expected, within=60)
    assert report.ok, report.summary()

    async with await psycopg.AsyncConnection.connect(fault_database_url, autocommit=True) as db:
        cur = await db.execute(
            "SELECT id, entity_id FROM workflow_executions WHERE workflow_name = %s ORDER BY id",
            ("approve-within-2s",),
        )
        (expired, entity), (short, _) = await cur.fetchall()
        # The branch of an outcome that did not happen ran (on_approved is step 3) ...
        await db.execute(
            "INSERT INTO execution_steps (execution_id, step, action, status)"
            " VALUES (%s, 3, 'assign', 'completed')",
            (expired,),
        )
        await db.execute(
            "INSERT INTO assignments (execution_id, step, entity_id, assignee)"
            " VALUES (%s, 3, %s, 'publisher')",
            (expired, entity),
        )
        # ... the branch of the one that did (steps 4 and 5) stopped short ...
        await db.execute(
            "DELETE FROM execution_steps WHERE execution_id = %s AND step = 5", (short,)
        )
        await db.execute("DELETE FROM tasks WHERE execution_id = %s AND step = 5", (short,))
        # ... and a task is open again under its completed execution.
        await db.execute("UPDATE tasks SET status = 'open' WHERE wait AND step = 1")

    report = await run_check(fault_redis.url, fault_database_url, expected)
    kinds = {p.split(" x", 1)[0] for p in report.problems}
    assert kinds == {
        "steps done off the execution's path",
        "completed executions with a step not done",
        "completed executions still waiting",
    }, report.summary()


async def test_the_receiver_counts_whole_requests_only() -> None:
    # A worker SIGKILLed between a request's headers and its body sends half a request:
    # no server acts on it, so neither may the checker's count of deliveries.
    head = "POST /h HTTP/1.1\r\nHost: x\r\nIdempotency-Key: {key}\r\nContent-Length: 7\r\n\r\n"
    with receiving() as hooks:
        for key, body in (("torn", b""), ("torn", b"{}"), ("whole", b'{"a":1}')):
            stream = await anyio.connect_tcp("127.0.0.1", hooks.port)
            await stream.send(head.format(key=key).encode() + body)
            if key == "whole":  # answered once recorded
                assert b" 200 " in await stream.receive()
            await stream.aclose()
        await anyio.sleep(0.2)  # time for a torn request to be (wrongly) recorded
    assert hooks.deliveries() == {"whole": [b'{"a":1}']}
