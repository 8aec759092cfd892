"""``consumers.streams``: the claim sweep reaches idle entries behind many busy ones;
entries appended in bulk land whole and in order."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from govflow.consumers.streams import APPEND_CHUNK, Streams

pytestmark = pytest.mark.anyio

GROUP = "actions"
COUNT = 2  # XAUTOCLAIM looks at no more than 10 * COUNT pending entries per call


async def test_a_claim_sweep_goes_on_where_the_last_one_stopped(redis: Redis, prefix: str) -> None:
    stream = f"{prefix}:commands"
    added: list[Any] = [await redis.xadd(stream, {"n": str(i)}) for i in range(30)]
    ids = [entry_id.decode() for entry_id in added]
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "busy", {stream: ">"}, count=30)
    # The last entry's consumer went away 100 s ago; the 29 before it are being worked on.
    await redis.xclaim(stream, GROUP, "gone", 0, [ids[-1]], idle=100_000)
    streams = Streams(redis)

    first, cursor = await streams.claim_idle(stream, GROUP, "me", 50_000, COUNT)
    assert first == []
    assert cursor != "0-0", "the first call looked at every pending entry"
    claimed, cursor = await streams.claim_idle(stream, GROUP, "me", 50_000, COUNT, cursor)
    assert [e.id for e in claimed] == [ids[-1]]
    assert cursor == "0-0"
    pending: Any = await redis.xpending_range(stream, GROUP, ids[-1], ids[-1], 1)
    assert pending[0]["consumer"] == b"me"


@pytest.mark.parametrize("delete", ["xdel", "maxlen"])
async def test_a_claim_sweep_skips_entries_deleted_while_pending(
    any_redis: Redis, prefix: str, delete: str
) -> None:
    """On 6.2 and on 7: the live entry is claimed, the deleted one acknowledged, no error."""
    stream = f"{prefix}:commands"
    first: Any = await any_redis.xadd(stream, {"n": "0"})
    second: Any = await any_redis.xadd(stream, {"n": "1"})
    await any_redis.xgroup_create(stream, GROUP, id="0")
    await any_redis.xreadgroup(GROUP, "gone", {stream: ">"}, count=2)
    if delete == "xdel":
        await any_redis.xdel(stream, first)
    else:  # a producer trimming the stream as it adds
        await any_redis.xadd(stream, {"n": "2"}, maxlen=2, approximate=False)
    streams = Streams(any_redis)

    for _ in range(2):  # and again: the deleted entry is no longer pending
        claimed, cursor = await streams.claim_idle(stream, GROUP, "me", 0, COUNT)
        assert cursor == "0-0"
        assert [e.id for e in claimed] == [second.decode()]
    pending: Any = await any_redis.xpending_range(stream, GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(second, b"me")]


async def test_retiring_from_a_group_that_is_gone_retires_no_one(redis: Redis, prefix: str) -> None:
    """A failover to a replica that never had the stream takes the group with it: a consumer
    stopping then has no group to leave, and stops all the same."""
    streams = Streams(redis)
    stream = f"{prefix}:events"
    await streams.ensure_group(stream, "triggers")
    await redis.delete(stream)
    assert await streams.retire(stream, "triggers", "worker-1") is False


async def test_entries_appended_in_bulk_land_in_order_on_each_stream(
    redis: Redis, prefix: str
) -> None:
    many = [str(i).encode() for i in range(2 * APPEND_CHUNK + 1)]  # three script calls
    values = {f"{prefix}:a": many, f"{prefix}:b": [b"x"], f"{prefix}:c": []}
    await Streams(redis).append(b"command", values)
    for stream, sent in values.items():
        entries: Any = await redis.xrange(stream)
        assert [fields for _, fields in entries] == [{b"command": v} for v in sent]
