"""A worker whose claim sweep meets an entry deleted while pending carries on (6.2 and 7)."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.consumers.streams import EVENT_FIELD
from govflow.schemas.codec import encode
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from tests.pipeline_helpers import apply, running_worker, stream_state, wait_for, wait_settled

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REVIEW = """
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
"""


async def test_an_entry_deleted_while_pending_does_not_stop_the_claim_sweep(
    make_settings: Any, any_redis_url: str, any_redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    settings = make_settings(redis_url=any_redis_url, claim_idle=0.5)
    keys = Keys(settings.prefix)
    await apply(pool, REVIEW)
    stream = keys.events()
    await any_redis.xgroup_create(stream, "triggers", id="0", mkstream=True)
    ids: list[Any] = []
    for n in range(3):
        event = new_event("policy.created", f"POL-{n}", data={"title": f"P{n}"})
        ids.append(await any_redis.xadd(stream, {EVENT_FIELD: encode(event)}))
    # A consumer that died with all three in hand; then the first is deleted (XDEL, or a
    # producer trimming with MAXLEN) while still pending.
    await any_redis.xreadgroup("triggers", "gone", {stream: ">"}, count=3)
    await any_redis.xdel(stream, ids[0])

    async with running_worker(settings, concurrency=1):
        await wait_settled(pool, 2, within=30)
        state = await wait_for(
            lambda: stream_state(any_redis, keys),
            lambda s: s["triggers_pending"] == 0 and s["actions_pending"] == 0,
            within=10,
            what="nothing pending",
        )
    assert state["dead_stream"] == 0
