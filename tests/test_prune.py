"""Retention of executions and dead letters: what is finished and old goes, in bounded
batches, with everything that hangs off it; nothing unfinished or still needed ever does.
And the dead-letter stream is trimmed to what the table still holds."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.consumers import retention
from govflow.consumers.retention import Retention, prune, trim_dead_stream
from govflow.db import dead_letters, interventions
from govflow.db.dead_letters import NewDeadLetter
from govflow.db.prune import EXECUTION_ROWS
from govflow.schemas.errors import ConfigError
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.api_helpers import THREE_STEPS, seed_execution
from tests.pipeline_helpers import apply, fetch

pytestmark = pytest.mark.anyio

DAY = 86_400.0


async def sql(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> None:
    async with pool.connection() as conn:
        await conn.execute(query.encode(), params)


async def age(pool: AsyncConnectionPool[Any], exec_id: str, days: int) -> None:
    """Make an execution look finished ``days`` ago."""
    await sql(
        pool,
        "UPDATE workflow_executions SET finished_at = now() - make_interval(days => %s)"
        " WHERE id = %s::uuid",
        days,
        exec_id,
    )


# A row of each kind of effect: the columns besides (execution_id, step), and their values.
EFFECT_ROWS = {
    "approvals": ("entity_id, approvers", "'P1', '[\"ciso\"]'"),
    "tasks": ("entity_id, title", "'P1', 'Review'"),
    "assignments": ("entity_id, assignee", "'P1', 'risk-team'"),
    "notifications": ("webhook, message, idempotency_key", "'https://hooks.example/x', 'm', 'k'"),
    "status_changes": ("entity_type, entity_id, to_status, event_id", "'policy', 'P1', 'ok', 'e1'"),
}


async def effects_of(pool: AsyncConnectionPool[Any], exec_id: str) -> None:
    """A row of each kind of effect for an execution."""
    for step, (table, (columns, values)) in enumerate(EFFECT_ROWS.items(), start=11):
        await sql(
            pool,
            f"INSERT INTO {table} (execution_id, step, {columns})"
            f" VALUES (%s::uuid, {step}, {values})",
            exec_id,
        )


async def letter(pool: AsyncConnectionPool[Any], exec_id: str | None, n: int) -> int:
    """Record a dead letter (of an execution, or of an event when ``exec_id`` is None)."""
    async with pool.connection() as conn:
        await dead_letters.record(
            conn,
            [
                NewDeadLetter(
                    stream="gf:commands", message_id=f"1-{n}", payload={"command": "{}"},
                    error="boom", attempts=5, execution_id=exec_id,
                )
            ],
        )  # fmt: skip
        cur = await conn.execute("SELECT max(id) FROM dead_letters")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_prune_takes_only_what_is_finished_old_and_closed(
    pool: AsyncConnectionPool[Any],
) -> None:
    await apply(pool, THREE_STEPS)
    gone, kept = [], []
    for _ in range(3):  # three old completions, with steps and an intervention each
        finished = await seed_execution(pool, completed_steps=3, status="completed")
        async with pool.connection() as conn:
            await interventions.record(
                conn, finished, "retry", from_status="cancelled", actor="a", reason=None
            )
        gone.append(finished)
    await effects_of(pool, gone[0])
    cancelled = await seed_execution(pool)
    await sql(
        pool, "UPDATE workflow_executions SET status = 'cancelled' WHERE id = %s::uuid", cancelled
    )
    await sql(
        pool, "UPDATE workflow_executions SET finished_at = now() WHERE id = %s::uuid", cancelled
    )
    gone.append(cancelled)
    purged = await seed_execution(pool, failed_step=(1, "boom"), status="dead_lettered")
    purged_letter = await letter(pool, purged, 1)
    gone.append(purged)
    # Kept: a dead letter still open, or replayed lately; unfinished; finished lately.
    still_open = await seed_execution(pool, failed_step=(1, "boom"), status="dead_lettered")
    open_letter = await letter(pool, still_open, 2)
    replaying = await seed_execution(pool, failed_step=(1, "boom"), status="dead_lettered")
    replayed_letter = await letter(pool, replaying, 3)
    retrying = await seed_execution(pool, failed_step=(1, "boom"), status="retrying")
    kept += [still_open, replaying, retrying]
    for exec_id in gone + kept:
        await age(pool, exec_id, 40)
    kept.append(await seed_execution(pool, completed_steps=3, status="completed"))  # lately
    old_event_letter = await letter(pool, None, 4)
    await sql(
        pool,
        "UPDATE dead_letters SET purged_at = now() - interval '40 days' WHERE id = ANY(%s)",
        [purged_letter, old_event_letter],
    )
    await sql(pool, "UPDATE dead_letters SET replayed_at = now() WHERE id = %s", replayed_letter)

    dry = await prune(pool, 30 * DAY, dry_run=True)
    assert (dry.executions, dry.dead_letters) == (
        {"completed": 3, "cancelled": 1, "dead_lettered": 1},
        2,
    )
    done = await prune(pool, 30 * DAY, batch=2)
    assert (done.executions, done.dead_letters) == (dry.executions, dry.dead_letters)
    assert done.batches == 3 + 1  # 5 executions two at a time, then 2 letters

    left = {row[0] for row in await fetch(pool, "SELECT id::text FROM workflow_executions")}
    assert left == set(kept)
    for table in ("execution_interventions", *EXECUTION_ROWS):
        rows = await fetch(
            pool, f"SELECT count(*) FROM {table} WHERE execution_id::text = ANY(%s)", gone
        )
        assert rows == [(0,)], table
    letters = {row[0] for row in await fetch(pool, "SELECT id FROM dead_letters")}
    assert letters == {open_letter, replayed_letter}
    after = await prune(pool, 30 * DAY)
    assert (after.total, after.dead_letters, after.batches) == (0, 0, 0)


async def test_the_dead_stream_keeps_the_letters_the_table_holds(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    """A replayed or purged letter keeps its copy, as history, until its row is pruned."""
    keys = Keys(prefix)
    ids = [await letter(pool, None, n) for n in range(5)]
    entry_ids = []
    for n in range(5):
        added: Any = await redis.xadd(
            keys.dead(), {"stream": "gf:commands", "message_id": f"1-{n}"}
        )
        entry_ids.append(added.decode())
    await sql(pool, "UPDATE dead_letters SET purged_at = now() WHERE id = ANY(%s)", ids[:2])
    await sql(pool, "UPDATE dead_letters SET replayed_at = now() WHERE id = %s", ids[3])
    assert await trim_dead_stream(redis, pool, keys.dead()) == 0  # every row is still held

    await sql(pool, "DELETE FROM dead_letters WHERE id = ANY(%s)", ids[:2])  # pruned
    assert await trim_dead_stream(redis, pool, keys.dead()) == 2
    remaining: Any = await redis.xrange(keys.dead())
    assert [e.decode() for e, _ in remaining] == entry_ids[2:]  # the held one and after

    # Every row gone: everything goes, except what a reader's group has not acknowledged.
    await sql(pool, "DELETE FROM dead_letters WHERE id = ANY(%s)", ids[2:])
    await redis.xgroup_create(keys.dead(), "alerts", id=entry_ids[2])
    assert await trim_dead_stream(redis, pool, keys.dead()) == 1
    assert await redis.xlen(keys.dead()) == 2
    await redis.xgroup_destroy(keys.dead(), "alerts")
    assert await trim_dead_stream(redis, pool, keys.dead()) == 2
    assert await trim_dead_stream(redis, pool, keys.dead()) == 0


async def test_one_retention_sweep_at_a_time(
    pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    await apply(pool, THREE_STEPS)
    old = await seed_execution(pool, completed_steps=3, status="completed")
    await age(pool, old, 2)
    sweeper = Retention(redis, pool, Keys(prefix), retention_s=DAY)
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (retention.LOCK_KEY,))
        assert (await sweeper.sweep()).leader is False
    swept = await sweeper.sweep()
    assert swept.leader
    assert swept.pruned is not None
    assert swept.pruned.executions == {"completed": 1}
    off = await Retention(redis, pool, Keys(prefix), retention_s=None).sweep()
    assert (off.leader, off.pruned) == (True, None)


def test_the_retention_setting() -> None:
    assert Settings().execution_retention_s() is None
    assert Settings(execution_retention="30d").execution_retention_s() == 30 * DAY
    assert Settings.from_env({"GOVFLOW_EXECUTION_RETENTION": "12h"}).execution_retention_s() == (
        12 * 3600.0
    )
    assert Settings(execution_retention="off").execution_retention_s() is None
    with pytest.raises(ConfigError, match="GOVFLOW_EXECUTION_RETENTION: 'soon' is not a duration"):
        Settings(execution_retention="soon")
