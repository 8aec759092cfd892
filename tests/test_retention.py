"""Retention: the janitor trims only what every group acknowledged, beyond the kept count.

Run on the session's Redis (7 in CI) and on the embedded 6.2, since trimming by MINID and
the group bookkeeping it relies on differ between the two.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from govflow.consumers.janitor import Janitor, parse_id, safe_trim_id
from govflow.consumers.streams import Streams
from govflow.schemas.keys import Keys

pytestmark = pytest.mark.anyio

GROUP = "triggers"


async def fill(redis: Redis, stream: str, n: int = 10) -> list[str]:
    """``n`` entries and the group at the start; return their ids."""
    ids = []
    for i in range(n):
        added: Any = await redis.xadd(stream, {"n": str(i)})
        ids.append(added.decode())
    await redis.xgroup_create(stream, GROUP, id="0")
    return ids


async def deliver(redis: Redis, stream: str, count: int, consumer: str = "c1") -> None:
    await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)


async def remaining(redis: Redis, stream: str) -> list[str]:
    entries: Any = await redis.xrange(stream)
    return [entry_id.decode() for entry_id, _ in entries]


def janitor(redis: Redis, keys: Keys, retention: int, page: int = 5000) -> Janitor:
    return Janitor(Streams(redis), keys, retention=retention, consumer_gc_s=3600, page=page)


async def test_pending_and_undelivered_entries_are_never_trimmed(
    any_redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    stream = keys.events()
    ids = await fill(any_redis, stream)
    await deliver(any_redis, stream, 6)  # 0..5 delivered, 6..9 not
    await any_redis.xack(stream, GROUP, ids[0], ids[1], ids[2], ids[4])  # 3 and 5 pending
    await any_redis.xgroup_create(stream, "audit", id=ids[1])  # a second group, behind
    trim = janitor(any_redis, keys, retention=0).trim

    # The group that is furthest behind sets the boundary.
    assert await trim(stream) == 2
    assert await remaining(any_redis, stream) == ids[2:]

    await any_redis.xgroup_destroy(stream, "audit")
    assert await trim(stream) == 1  # up to the oldest pending entry, not beyond
    assert await remaining(any_redis, stream) == ids[3:]
    # The pending entry keeps its payload, so the consumer that claims it can run it.
    claimed: Any = await any_redis.xclaim(stream, GROUP, "c2", 0, [ids[3]])
    assert claimed[0][1] == {b"n": b"3"}

    await any_redis.xack(stream, GROUP, ids[3], ids[5])
    assert await trim(stream) == 3  # 3, 4, 5: everything acknowledged
    assert await remaining(any_redis, stream) == ids[6:]  # the undelivered stay
    assert await trim(stream) == 0

    await deliver(any_redis, stream, 10)
    assert await trim(stream) == 0  # delivered, not yet acknowledged
    await any_redis.xack(stream, GROUP, *ids[6:])
    assert await trim(stream) == 4
    assert await any_redis.xlen(stream) == 0


async def test_retention_keeps_the_newest_acknowledged_entries(
    any_redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    stream = keys.commands()
    ids = await fill(any_redis, stream)
    await deliver(any_redis, stream, 10)
    await any_redis.xack(stream, GROUP, *ids[:2], *ids[3:])  # all but 2
    trim = janitor(any_redis, keys, retention=3).trim

    assert await safe_trim_id(any_redis, stream) == parse_id(ids[2])
    assert await trim(stream) == 2  # retention alone would allow 7; entry 2 is pending
    assert await remaining(any_redis, stream) == ids[2:]

    await any_redis.xack(stream, GROUP, ids[2])
    boundary = await safe_trim_id(any_redis, stream)
    assert boundary is not None
    assert boundary > parse_id(ids[9])  # all acknowledged
    assert await trim(stream) == 5
    assert await remaining(any_redis, stream) == ids[7:]  # the newest three, kept for inspection


async def test_nothing_is_trimmed_without_a_group_or_below_retention(
    any_redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    stream = keys.events()
    for i in range(5):
        await any_redis.xadd(stream, {"n": str(i)})
    # Published before any worker ran: those entries wait for the group that will come.
    assert await safe_trim_id(any_redis, stream) is None
    assert await janitor(any_redis, keys, retention=0).trim(stream) == 0

    await any_redis.xgroup_create(stream, GROUP, id="0")
    await deliver(any_redis, stream, 5)
    entries: Any = await any_redis.xrange(stream)
    await any_redis.xack(stream, GROUP, *[entry_id for entry_id, _ in entries])
    assert await janitor(any_redis, keys, retention=5).trim(stream) == 0  # only 5 kept: none
    assert await any_redis.xlen(stream) == 5


async def test_sweep_trims_every_stream_of_every_partition(any_redis: Redis, prefix: str) -> None:
    keys = Keys(prefix, partitions=2)
    streams = [keys.events(1), keys.commands(0)]
    for stream in streams:
        ids = await fill(any_redis, stream, 4)
        await deliver(any_redis, stream, 4)
        await any_redis.xack(stream, GROUP, *ids[:3])  # the newest stays pending
    await janitor(any_redis, keys, retention=0).sweep()
    for stream in streams:
        assert await any_redis.xlen(stream) == 1


async def test_one_sweep_trims_every_acknowledged_entry_beyond_retention(
    any_redis: Redis, prefix: str
) -> None:
    """However many entries a drain acknowledged since the last sweep, a sweep trims them
    all (a page per script call), and still stops at the oldest pending one."""
    keys = Keys(prefix)
    stream = keys.commands()
    ids = await fill(any_redis, stream, 30)
    await deliver(any_redis, stream, 30)
    await any_redis.xack(stream, GROUP, *ids[:20], *ids[21:])  # 20 pending
    trim = janitor(any_redis, keys, retention=3, page=4).trim

    assert await trim(stream) == 20  # five pages, up to the pending entry
    assert await remaining(any_redis, stream) == ids[20:]

    await any_redis.xack(stream, GROUP, ids[20])
    assert await trim(stream) == 7  # two pages, down to the three kept
    assert await remaining(any_redis, stream) == ids[27:]
    assert await trim(stream) == 0
