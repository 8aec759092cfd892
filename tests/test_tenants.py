"""Events are identified by (tenant, id): two tenants' events of one id both run, once each."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db import executions
from govflow.db.executions import NewExecution
from govflow.schemas.commands import execution_id
from govflow.schemas.events import new_event
from tests.pipeline_helpers import (
    apply,
    effect_problems,
    fetch,
    publish,
    running_worker,
    stream_state,
    wait_settled,
)

pytestmark = pytest.mark.anyio

REVIEW = """
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
"""


@pytest.mark.slow
async def test_two_tenants_may_use_one_event_id_and_each_event_runs_once(
    settings: Any, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    await apply(pool, REVIEW)
    same = str(uuid.uuid4())
    events = [
        new_event("policy.created", "P1", tenant=tenant, id=same, data={"title": tenant})
        for tenant in ("acme", "globex", "default")
    ]
    async with running_worker(settings):
        await publish(redis, settings.keys(), [*events, events[0], events[1]])  # twice each
        await wait_settled(pool, 3, within=30)
    rows = await fetch(pool, "SELECT tenant, event_id, id::text FROM workflow_executions")
    assert sorted(rows) == sorted(
        (e.tenant, same, execution_id(e.tenant, same, "review")) for e in events
    )
    titles = await fetch(pool, "SELECT title FROM tasks ORDER BY title")
    assert titles == [("Review acme",), ("Review default",), ("Review globex",)]
    assert await effect_problems(pool) == []
    assert (await stream_state(redis, settings.keys()))["dead_stream"] == 0


async def test_an_execution_recorded_before_tenants_counted_is_found_by_its_identity(
    pool: AsyncConnectionPool[Any],
) -> None:
    """A row of tenant ``acme`` whose id was derived without the tenant (an older govflow)
    is the one its event finds again: no second row, and the row's own id comes back."""
    await apply(pool, REVIEW)
    old_id = str(uuid.uuid5(uuid.UUID("6c1f7d4e-3b0a-4f2e-9a51-0c9e7f3d2b18"), "E1\x1freview"))
    now = datetime.now(UTC)

    def row(exec_id: str) -> NewExecution:
        return NewExecution(exec_id, "review", 1, "E1", "policy", "P1", "acme", now)

    async with pool.connection() as conn:
        (recorded,) = await executions.insert_queued(conn, [row(old_id)])
        assert (recorded.id, recorded.new) == (old_id, True)
        derived = execution_id("acme", "E1", "review")
        assert derived != old_id
        (found,) = await executions.insert_queued(conn, [row(derived)])
    assert (found.derived, found.id, found.new) == (derived, old_id, False)
    assert await fetch(pool, "SELECT id::text FROM workflow_executions") == [(old_id,)]
