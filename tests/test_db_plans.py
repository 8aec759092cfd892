"""The actions stage's reads look each execution up by key, even on tables without statistics.

A backlog drained right after a deploy fills tables that autovacuum has not analyzed yet;
a query whose plan depended on statistics then scanned every step row for each batch, so
the cost per event grew with the backlog. Each test fills fresh tables (no ANALYZE) and
reads the plan Postgres picks for a batch.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from govflow.db import fencing
from govflow.db.batch import id_array
from govflow.db.decisions import OUTCOMES
from govflow.db.executions import _NEW_EXECUTIONS, FINISH, STATES

pytestmark = pytest.mark.anyio

ROWS = 20_000
BATCH = 200
# Two steps per execution and a task each, as the benchmark's workflow leaves them.
FILL = f"""
INSERT INTO workflows (name, version, entity, trigger, definition)
  VALUES ('w', 1, 'policy', 'create', '{{"name": "w", "entity": "policy", "actions": []}}');
INSERT INTO workflow_executions (id, workflow_name, workflow_version, event_id, entity_type,
    entity_id, tenant, status)
  SELECT md5(i::text)::uuid, 'w', 1, 'e' || i, 'policy', 'P' || i, 'default', 'completed'
  FROM generate_series(1, {ROWS}) i;
INSERT INTO execution_steps (execution_id, step, action, status, attempts)
  SELECT md5(i::text)::uuid, s, 'a', 'completed', 1
  FROM generate_series(1, {ROWS}) i, generate_series(1, 2) s;
INSERT INTO tasks (execution_id, step, entity_id, title)
  SELECT md5(i::text)::uuid, 1, 'P' || i, 't' FROM generate_series(1, {ROWS}) i;
"""


async def plan_of(conn: psycopg.AsyncConnection[Any], query: str, ids: list[str]) -> str:
    cur = await conn.execute(f"EXPLAIN {query}".encode(), (id_array(ids),))
    return "\n".join(row[0] for row in await cur.fetchall())


async def batch_ids(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    cur = await conn.execute(
        "SELECT md5(i::text)::uuid::text FROM generate_series(%s::int, %s::int) i",
        (ROWS - BATCH + 1, ROWS),
    )
    return [row[0] for row in await cur.fetchall()]


@pytest.fixture
async def fresh(pool: AsyncConnectionPool) -> AsyncConnectionPool:
    """The pool, its tables filled and never analyzed."""
    async with pool.connection() as conn:
        await conn.execute(FILL.encode())
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stats WHERE tablename IN"
            " ('workflow_executions', 'execution_steps', 'tasks')"
        )
        assert await cur.fetchone() == (0,)  # no statistics: what a deploy's first drain sees
    return pool


async def test_states_look_each_execution_up_by_key(fresh: AsyncConnectionPool) -> None:
    async with fresh.connection() as conn:
        plan = await plan_of(conn, STATES, await batch_ids(conn))
    assert "workflow_executions_pkey" in plan
    assert "execution_steps_pkey" in plan
    assert "Seq Scan" not in plan
    assert "Hash" not in plan


async def test_outcomes_look_each_execution_up_by_key(fresh: AsyncConnectionPool) -> None:
    async with fresh.connection() as conn:
        plan = await plan_of(conn, OUTCOMES, await batch_ids(conn))
    assert "tasks_execution_id_step_key" in plan
    assert "Seq Scan on tasks" not in plan
    assert "Hash" not in plan


# On an empty table Postgres assumes a few pages, where a scan beats ten lookups; a plan
# cached then (a prepared statement's generic plan) was kept as the table grew, and every
# batch scanned every execution. The statements that lock and update executions by id
# must look them up by key from the first batch on.
SMALL_BATCH = [f"00000000-0000-0000-0000-{i:012d}" for i in range(10)]


async def explain(conn: psycopg.AsyncConnection[Any], query: str, params: tuple[Any, ...]) -> str:
    cur = await conn.execute(f"EXPLAIN {query}".encode(), params)
    return "\n".join(row[0] for row in await cur.fetchall())


@pytest.mark.parametrize(
    ("name", "query", "params"),
    [
        ("lock", fencing.LOCK, (id_array(SMALL_BATCH),)),
        ("claim", fencing.CLAIM, (id_array(SMALL_BATCH),)),
        ("hold", fencing.HOLD, (id_array(SMALL_BATCH), "{" + ",".join(["1"] * 10) + "}")),
        ("finish", FINISH.format(started=""), (id_array(SMALL_BATCH),)),
        (
            "finish started",
            FINISH.format(started=fencing.started_items(True)),
            (id_array(SMALL_BATCH),),
        ),
    ],
)
async def test_executions_are_locked_and_updated_by_key_on_an_empty_table(
    pool: AsyncConnectionPool, name: str, query: str, params: tuple[Any, ...]
) -> None:
    async with pool.connection() as conn:
        plan = await explain(conn, query, params)
    assert "workflow_executions_pkey" in plan, f"{name}:\n{plan}"
    assert "Seq Scan on workflow_executions" not in plan, f"{name}:\n{plan}"
    assert "Hash" not in plan, f"{name}:\n{plan}"


async def test_known_executions_are_found_by_identity_on_an_empty_table(
    pool: AsyncConnectionPool,
) -> None:
    rows = [
        (uid, "w", 1, f"e{i}", "policy", f"P{i}", "default", "2026-01-01T00:00:00Z")
        for i, uid in enumerate(SMALL_BATCH)
    ]
    async with pool.connection() as conn:
        plan = await explain(
            conn, _NEW_EXECUTIONS.statement(), (_NEW_EXECUTIONS.parameter(rows), 60)
        )
    assert "workflow_executions_tenant_event_id_workflow_name_key" in plan, plan
    assert "Seq Scan on workflow_executions" not in plan, plan
    assert "Hash" not in plan, plan


async def test_the_pool_compiles_no_query(pool: AsyncConnectionPool) -> None:
    """JIT compilation is chosen by estimated cost, which runs high on fresh tables."""
    async with pool.connection() as conn:
        cur = await conn.execute("SHOW jit")
        assert await cur.fetchone() == ("off",)
