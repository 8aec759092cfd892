"""Workflow definitions in Postgres: versions, unchanged re-applies, concurrency."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest
from psycopg_pool import AsyncConnectionPool

from govflow.db.workflows import apply_workflow, enabled_latest, get_version, list_workflows
from govflow.schemas.workflows import Workflow

pytestmark = pytest.mark.anyio


def workflow(name: str = "review", **changes: Any) -> Workflow:
    raw: dict[str, Any] = {
        "name": name,
        "entity": "policy",
        "trigger": "status_change",
        "when": [{"field": "status", "equals": "pending_approval"}, {"changed": "owner"}],
        "actions": [{"create_task": {"title": "Review {data.title}"}}, {"assign": {"to": "x"}}],
    }
    return msgspec.convert({**raw, **changes}, Workflow)


async def apply(pool: AsyncConnectionPool, wf: Workflow) -> tuple[int, bool]:
    async with pool.connection() as conn:
        return await apply_workflow(conn, wf)


async def test_apply_makes_a_version_per_change(pool: AsyncConnectionPool) -> None:
    first = workflow()
    second = workflow(actions=[{"assign": {"to": "y"}}])

    assert await apply(pool, first) == (1, True)
    assert await apply(pool, first) == (1, False)
    assert await apply(pool, second) == (2, True)
    assert await apply(pool, second) == (2, False)
    # Going back to the first definition is a change too: a new version, not version 1.
    assert await apply(pool, first) == (3, True)

    async with pool.connection() as conn:
        v1 = await get_version(conn, "review", 1)
        v2 = await get_version(conn, "review", 2)
        assert await get_version(conn, "review", 9) is None
        assert await get_version(conn, "other", 1) is None
    assert v1 is not None
    assert v1.definition == first
    assert v2 is not None
    assert (v2.name, v2.version, v2.definition) == ("review", 2, second)


async def test_definition_survives_the_round_trip(pool: AsyncConnectionPool) -> None:
    wf = workflow(when=[{"field": "risk", "in": ["high", "critical"]}], ordering="entity")
    await apply(pool, wf)
    async with pool.connection() as conn:
        [row] = await list_workflows(conn)
        cur = await conn.execute("SELECT entity, trigger, enabled FROM workflows")
        columns = await cur.fetchone()
    assert row.definition == wf
    assert (row.name, row.version, row.entity, row.trigger, row.enabled) == (
        "review",
        1,
        "policy",
        "status_change",
        True,
    )
    assert columns == ("policy", "status_change", True)
    assert row.created_at.tzinfo is not None


async def test_list_latest_or_every_version(pool: AsyncConnectionPool) -> None:
    await apply(pool, workflow("b"))
    await apply(pool, workflow("a"))
    await apply(pool, workflow("a", trigger="update"))

    async with pool.connection() as conn:
        latest = await list_workflows(conn)
        every = await list_workflows(conn, all_versions=True)
    assert [(w.name, w.version) for w in latest] == [("a", 2), ("b", 1)]
    assert [(w.name, w.version) for w in every] == [("a", 1), ("a", 2), ("b", 1)]
    assert latest[0].trigger == "update"


async def test_enabled_latest_skips_workflows_switched_off(pool: AsyncConnectionPool) -> None:
    await apply(pool, workflow("on"))
    await apply(pool, workflow("off"))
    await apply(pool, workflow("off", enabled=False))
    await apply(pool, workflow("on", trigger="create"))

    async with pool.connection() as conn:
        running = await enabled_latest(conn)
    # "off" does not fall back to its enabled version 1: disabling is a version too.
    assert [(w.name, w.version) for w in running] == [("on", 2)]
    assert running[0].definition.trigger == "create"


async def test_concurrent_applies_of_one_definition_store_it_once(
    pool: AsyncConnectionPool,
) -> None:
    wf = workflow()
    results: list[tuple[int, bool]] = []

    async def one() -> None:
        results.append(await apply(pool, wf))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(one)

    assert sorted(results) == [(1, False)] * 7 + [(1, True)]
    async with pool.connection() as conn:
        assert len(await list_workflows(conn, all_versions=True)) == 1


async def test_concurrent_applies_of_changes_get_distinct_versions(
    pool: AsyncConnectionPool,
) -> None:
    variants = [workflow(actions=[{"assign": {"to": f"team-{i}"}}]) for i in range(8)]
    results: list[tuple[int, bool]] = []

    async def one(wf: Workflow) -> None:
        results.append(await apply(pool, wf))

    async with anyio.create_task_group() as tg:
        for wf in variants:
            tg.start_soon(one, wf)

    assert sorted(results) == [(v, True) for v in range(1, 9)]
