"""The reconciler against real Redis and Postgres: what it puts back, what it leaves alone.

Each test records an execution (or an outbox row) the way the trigger matcher (or the relay)
would, makes it overdue by moving its clock back, arranges what Redis still carries of it,
and runs sweeps.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.consumers.definitions import Definitions
from govflow.consumers.reconcile import Reconciler, Sweep
from govflow.consumers.streams import COMMAND_FIELD, Entry, Streams
from govflow.consumers.triggers import TriggerMatcher
from govflow.db import executions, reconcile
from govflow.db.executions import NewExecution
from govflow.db.outbox import enqueue
from govflow.operations.lag import read_lag
from govflow.schemas.codec import decode_command, decode_event, encode
from govflow.schemas.commands import RunWorkflow, execution_id
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from tests.pipeline_helpers import add_entry, apply, entries, scalar

pytestmark = pytest.mark.anyio

AFTER_S = 60.0
WORKFLOW = """
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
"""


async def record(pool: AsyncConnectionPool[Any], n: int = 1) -> list[RunWorkflow]:
    """Record ``n`` queued executions as the matcher does, then make them overdue."""
    await apply(pool, WORKFLOW)
    commands = []
    async with pool.connection() as conn:
        for i in range(n):
            event = new_event("policy.created", f"POL-{i}", data={"title": f"P{i}"})
            exec_id = execution_id(event.tenant, event.id, "review")
            row = NewExecution(
                exec_id, "review", 1, event.id, "policy", event.entity_id, event.tenant,
                event.occurred_at,
            )  # fmt: skip
            taken = reconcile.Received(event.tenant, event.id, encode(event).decode())
            await executions.insert_queued(conn, [row], None, [taken])  # in one statement
            commands.append(
                RunWorkflow(
                    execution_id=exec_id, workflow_name="review", workflow_version=1, event=event
                )
            )
    await make_overdue(pool)
    return commands


async def make_overdue(pool: AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE workflow_executions SET updated_at = updated_at - interval '1 hour'"
        )


async def commands_on_stream(redis: Redis, keys: Keys, partition: int = 0) -> list[str]:
    """The execution ids of the commands on a partition's commands stream, oldest first."""
    found = await entries(redis, keys.commands(partition))
    return [decode_command(fields[COMMAND_FIELD]).execution_id for _, fields in found]


def reconciler(redis: Redis, pool: AsyncConnectionPool[Any], keys: Keys) -> Reconciler:
    return Reconciler(Streams(redis), pool, keys, after_s=AFTER_S)


async def test_a_queued_execution_redis_lost_is_emitted_again_once(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    [command] = await record(pool)
    sweeps = reconciler(redis, pool, keys)

    first = await sweeps.sweep()
    assert (first.executions, first.reemitted) == (1, 1)
    assert await commands_on_stream(redis, keys) == [command.execution_id]
    [(_, fields)] = await entries(redis, keys.commands())
    assert decode_command(fields[COMMAND_FIELD]) == command  # the same command, event and all
    # Put back once: the touch restarted its bound.
    assert (await sweeps.sweep()).executions == 0
    # Overdue again, but its command waits on the stream now: left alone.
    await make_overdue(pool)
    again = await sweeps.sweep()
    assert (again.executions, again.reemitted) == (1, 0)
    assert await commands_on_stream(redis, keys) == [command.execution_id]


@pytest.mark.parametrize("trace", ["pending command", "scheduled retry", "pending event"])
async def test_an_execution_redis_still_carries_is_left_alone(
    pool: AsyncConnectionPool[Any], any_redis_url: str, prefix: str, trace: str
) -> None:
    keys = Keys(prefix)
    [command] = await record(pool)
    async with Redis.from_url(any_redis_url) as redis:
        streams = Streams(redis)
        if trace == "pending command":
            await redis.xadd(keys.commands(), {COMMAND_FIELD: encode(command)})
            await streams.ensure_group(keys.commands(), "actions")
            assert await streams.read(keys.commands(), "actions", "w1", 10, 1)
        elif trace == "scheduled retry":
            member = {
                "to": "commands",
                "id": "1-1",
                "fields": ["command", encode(command).decode()],
            }
            await redis.zadd(keys.retry(), {encode(member): 2**40})
        else:  # the event is still in the matcher's hands, which emits the command again
            await redis.xadd(keys.events(), {b"event": encode(command.event)})
            await streams.ensure_group(keys.events(), "triggers")
            assert await streams.read(keys.events(), "triggers", "w1", 10, 1)
        # Other traffic in the same places does not hide or fake anything.
        other = new_event("policy.created", "POL-other")
        await redis.xadd(keys.events(), {b"event": encode(other)})

        done = await Reconciler(streams, pool, keys, after_s=AFTER_S).sweep()

        assert (done.executions, done.reemitted, done.undecided) == (1, 0, 0)
        status = await scalar(pool, "SELECT status FROM workflow_executions")
        assert status == "queued"


async def test_with_partitions_each_command_goes_back_to_its_entitys_partition(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix, partitions=4)
    commands = await record(pool, 12)
    held = commands[0]  # its entity waits behind a retry of its own: carried
    await redis.hset(keys.held("actions", keys.partition_of(held.event.entity_id)), held.event.entity_id, "1-1")  # fmt: skip

    done = await reconciler(redis, pool, keys).sweep()

    assert (done.executions, done.reemitted) == (12, 11)
    for p in keys.all_partitions():
        assert sorted(await commands_on_stream(redis, keys, p)) == sorted(
            c.execution_id for c in commands[1:] if keys.partition_of(c.event.entity_id) == p
        )


async def test_too_many_entries_to_look_at_decides_nothing(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    await record(pool)
    for i in range(5):
        await redis.xadd(keys.commands(), {COMMAND_FIELD: b"{}", b"n": str(i).encode()})

    done = await Reconciler(Streams(redis), pool, keys, after_s=AFTER_S, scan_limit=3).sweep()

    assert (done.undecided, done.reemitted) == (1, 0)


async def test_two_reconcilers_at_once_emit_each_command_once(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    commands = await record(pool, 20)
    results: list[Sweep] = []

    async def sweep() -> None:
        results.append(await reconciler(redis, pool, keys).sweep())

    for _ in range(3):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(sweep)

    assert sum(r.reemitted for r in results) == 20
    assert sorted(await commands_on_stream(redis, keys)) == sorted(c.execution_id for c in commands)


async def test_a_published_outbox_row_whose_event_was_lost_is_published_again(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    lost, taken = new_event("policy.created", "POL-1"), new_event("policy.created", "POL-2")
    async with pool.connection() as conn:
        for event in (lost, taken):
            await enqueue(conn, event)
        await conn.execute("UPDATE outbox SET published_at = now() - interval '1 hour'")
        # Taken up by the matcher, matching no workflow: no execution, the event recorded.
        await executions.insert_queued(conn, [], None, [reconcile.Received(taken.tenant, taken.id)])

    report = await read_lag(redis, pool, keys, overdue_after_s=AFTER_S)
    assert report.outbox is not None
    assert report.outbox.overdue == 2  # shown before the reconciler acts

    sweeps = reconciler(redis, pool, keys)
    done = await sweeps.sweep()
    assert (done.taken, done.outbox, done.republished) == (1, 1, 1)
    [(_, fields)] = await entries(redis, keys.events())
    assert decode_event(fields[b"event"]) == lost
    assert (await sweeps.sweep()).republished == 0  # published once; its bound restarted
    report = await read_lag(redis, pool, keys, overdue_after_s=AFTER_S)
    assert report.outbox is not None
    assert report.outbox.overdue == 0


async def test_lag_counts_overdue_executions(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    assert (await read_lag(redis, pool, keys, overdue_after_s=AFTER_S)).overdue == 0
    await record(pool, 3)
    assert (await read_lag(redis, pool, keys, overdue_after_s=AFTER_S)).overdue == 3


async def test_a_republished_event_emits_the_commands_of_its_unfinished_executions(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    [command] = await record(pool)  # recorded long ago; its command lost
    matcher = TriggerMatcher(Streams(redis), pool, keys, Definitions(pool), stale_after_s=AFTER_S)
    fields = {b"event": encode(command.event)}
    entry = Entry(keys.events(), await add_entry(redis, keys.events(), fields), fields)

    outcomes = await matcher.handle([entry])

    assert [o.kind for o in outcomes] == ["ack"]
    assert await commands_on_stream(redis, keys) == [command.execution_id]
    # A fresh execution found again on a first delivery is not emitted twice.
    fresh = new_event("policy.created", "POL-fresh", data={"title": "F"})
    fields = {b"event": encode(fresh)}  # published twice, each a first delivery
    await matcher.handle([Entry(keys.events(), "1-1", fields)])
    await matcher.handle([Entry(keys.events(), "1-2", fields)])
    received = await scalar(pool, "SELECT count(*) FROM received_events")
    assert received == 2
    assert (await commands_on_stream(redis, keys)).count(
        execution_id(fresh.tenant, fresh.id, "review")
    ) == 1


async def test_an_event_that_matches_nothing_counts_as_taken_up(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    matcher = TriggerMatcher(Streams(redis), pool, keys, Definitions(pool))
    event = new_event("assessment.created", "AS-1")
    async with pool.connection() as conn:
        await enqueue(conn, event)
        await conn.execute("UPDATE outbox SET published_at = now() - interval '1 hour'")

    await matcher.handle([Entry(keys.events(), "1-1", {b"event": encode(event)})])
    done = await reconciler(redis, pool, keys).sweep()

    assert (done.taken, done.republished) == (1, 0)
    stored = await scalar(pool, "SELECT event IS NULL FROM received_events")
    assert stored is True  # nothing to run: the event itself is not kept


@pytest.mark.parametrize(
    "raw",
    [b'{"id": "bad-1", "tenant": 5, "type": "policy.exploded"}', b'{"id": "bad-2", "data": 1}'],
)
async def test_an_outbox_row_that_is_no_event_counts_as_taken_up_once_dead_lettered(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str, raw: bytes
) -> None:
    keys = Keys(prefix)
    matcher = TriggerMatcher(Streams(redis), pool, keys, Definitions(pool))
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO outbox (event, published_at) VALUES (%s::jsonb, now() - interval '1 hour')",
            (raw.decode(),),
        )

    outcomes = await matcher.handle([Entry(keys.events(), "1-1", {b"event": raw})])
    done = await reconciler(redis, pool, keys).sweep()

    assert [o.kind for o in outcomes] == ["dead"]
    assert (done.taken, done.republished) == (1, 0)
