"""The claim sweep of ``consumers.streams``: idle entries behind many busy ones are reached."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from govflow.consumers.streams import Streams

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
