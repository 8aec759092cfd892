"""A definition applied governs every event published after the apply returned."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.schemas.events import new_event
from govflow.schemas.settings import Settings
from tests.pipeline_helpers import apply, fetch, publish, running_worker, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REVIEW = """
name: review
entity: policy
trigger: create
actions:
  - create_task: {{title: "Review, version {n}"}}
"""
ROUNDS = 6


async def test_an_event_published_right_after_an_apply_runs_the_applied_version(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    async with running_worker(settings, concurrency=1):
        for n in range(1, ROUNDS + 1):
            assert await apply(pool, REVIEW.format(n=n)) == n
            event = new_event("policy.created", f"POL-{n}", data={"title": "Access"})
            await publish(redis, settings.keys(), [event])
            rows = await wait_for(
                lambda e=event.id: fetch(  # type: ignore[misc]
                    pool,
                    "SELECT workflow_version FROM workflow_executions WHERE event_id = %s",
                    e,
                ),
                bool,
                within=20,
                what=f"the execution of event {n}",
            )
            assert rows == [(n,)], f"event {n} ran version {rows[0][0]}"
