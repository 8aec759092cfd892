"""``consumers.settle``: each entry's fate, carried out once, and refused when fenced."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.consumers.outcomes import ACK, Outcome, RetryPolicy, dead, later
from govflow.consumers.scripts import Fence
from govflow.consumers.settle import Settler, Verdict
from govflow.consumers.streams import ATTEMPT_FIELD, Entry, Streams
from govflow.db import dead_letters
from govflow.schemas.keys import Keys

pytestmark = pytest.mark.anyio

GROUP = "actions"


async def delivered(redis: Redis, streams: Streams, stream: str, count: int) -> list[Entry]:
    """``count`` commands added to ``stream`` and read by consumer w1 of the group."""
    await streams.ensure_group(stream, GROUP)
    for i in range(count):
        await redis.xadd(stream, {"command": f"c{i}"})
    return await streams.read(stream, GROUP, "w1", 10, 100)


def settler_of(
    streams: Streams, pool: AsyncConnectionPool[Any], keys: Keys, fence: Fence | None = None
) -> Settler:
    """A settler of partition 0 of the commands' group, fenced on ``fence`` when given."""
    return Settler(
        streams=streams, pool=pool, keys=keys, role="commands", partition=0,
        policy=RetryPolicy(), fence=fence, stopping=lambda: False,
    )  # fmt: skip


async def test_an_entry_is_acknowledged_retried_or_dead_lettered_once(
    redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix, 1)
    streams = Streams(redis)
    stream = keys.commands()
    batch = await delivered(redis, streams, stream, 3)
    settler = settler_of(streams, pool, keys)
    verdicts = [
        Verdict(entry=batch[0], outcome=ACK),
        Verdict(entry=batch[1], outcome=Outcome(kind="retry", reason="boom", cause="error")),
        Verdict(entry=batch[2], outcome=dead("gave up", "permanent_error")),
    ]

    assert await settler.settle(verdicts)
    # Settling the same entries again (a claim after a crash) changes nothing.
    assert await settler.settle(verdicts)

    pending: Any = await redis.xpending(stream, GROUP)
    assert pending["pending"] == 0
    retries: Any = await redis.zrange(keys.retry(), 0, -1)
    assert len(retries) == 1
    assert f'"{ATTEMPT_FIELD.decode()}","2"'.encode() in retries[0]
    assert await redis.xlen(keys.dead()) == 1
    async with pool.connection() as conn:
        assert await dead_letters.count_open(conn) == 1


async def test_a_retry_that_failed_nothing_keeps_its_attempt(
    redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix, 1)
    streams = Streams(redis)
    [entry] = await delivered(redis, streams, keys.commands(), 1)
    busy = later("held elsewhere", "busy", 1.0)

    assert await settler_of(streams, pool, keys).settle([Verdict(entry=entry, outcome=busy)])

    retries: Any = await redis.zrange(keys.retry(), 0, -1, withscores=True)
    [(fields, due_ms)] = retries
    assert f'"{ATTEMPT_FIELD.decode()}","1"'.encode() in fields
    now_s, _ = await redis.time()
    assert now_s < due_ms / 1000 <= now_s + 2  # after the delay it asked for, not a backoff


async def test_a_settlement_is_refused_once_another_worker_holds_the_lease(
    redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix, 1)
    streams = Streams(redis)
    stream, lease = keys.commands(), keys.lease(GROUP)
    batch = await delivered(redis, streams, stream, 1)
    await redis.set(lease, "w2")
    settler = settler_of(streams, pool, keys, Fence(lease, "w1"))

    assert not await settler.settle([Verdict(entry=batch[0], outcome=ACK)])
    pending: Any = await redis.xpending(stream, GROUP)
    assert pending["pending"] == 1  # left for the lease's holder to take over


async def test_a_fenced_entry_is_left_pending_and_never_dead_lettered(
    redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix, 1)
    streams = Streams(redis)
    stream = keys.commands()
    batch = await delivered(redis, streams, stream, 2)
    settler = settler_of(streams, pool, keys)

    # Another delivery owns the first execution now: its entry is that delivery's to end.
    assert await settler.settle(
        [
            Verdict(entry=batch[0], outcome=Outcome(kind="fenced")),
            Verdict(entry=batch[1], outcome=ACK),
        ]
    )
    pending: Any = await redis.xpending_range(stream, GROUP, "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] == [batch[0].id]
    assert await redis.xlen(keys.dead()) == 0
    assert await redis.zcard(keys.retry()) == 0
    async with pool.connection() as conn:
        assert await dead_letters.count_open(conn) == 0
