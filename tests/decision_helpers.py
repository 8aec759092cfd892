"""Shared steps of the approval and task tests: a workflow that waits, and seeded rows.

Seeded approvals and tasks are written with the statements the built-in actions run
(``plugins.builtin``), on an execution recorded as the pipeline records one; the full
loops run the real pipeline instead.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool

from govflow.plugins.builtin import APPROVALS, TASKS
from tests.api_helpers import THREE_STEPS, seed_execution
from tests.pipeline_helpers import apply, scalar

# Waits for one of two approvers, then opens a task; a rejection sends the policy back.
WAITING = """\
name: policy-approval
entity: policy
trigger: create
actions:
  - create_approval:
      approvers: [compliance-officer, ciso]
      wait: true
      on_approved: [{assign: {assignee: publisher}}]
      on_rejected: [{assign: {assignee: "{data.owner}"}}]
  - create_task: {title: "Publish {data.title}", assignee: "{data.owner}"}
"""

PAST = timedelta(hours=-1)


async def seed_approval(
    pool: AsyncConnectionPool[Any],
    *,
    approvers: tuple[str, ...] = ("compliance-officer", "ciso"),
    required: int = 1,
    entity_id: str = "POL-1",
    due_in: timedelta | None = None,
) -> str:
    """An approval asked for by step 3 of a ``three-steps`` execution; return its id."""
    execution_id = await _seeded_execution(pool, entity_id)
    due_at = datetime.now(UTC) + due_in if due_in is not None else None
    row = (execution_id, 3, entity_id, list(approvers), required, due_at, False)
    async with pool.connection() as conn:
        await conn.execute(APPROVALS.statement().encode(), (APPROVALS.parameter([row]),))
    found: str = await scalar(
        pool, "SELECT id::text FROM approvals WHERE execution_id = %s", execution_id
    )
    return found


async def seed_task(
    pool: AsyncConnectionPool[Any],
    *,
    assignee: str | None = "user-17",
    entity_id: str = "POL-1",
    due_in: timedelta | None = None,
) -> str:
    """A task opened by step 1 of a ``three-steps`` execution; return its id."""
    execution_id = await _seeded_execution(pool, entity_id)
    due_at = datetime.now(UTC) + due_in if due_in is not None else None
    row = (execution_id, 1, entity_id, f"Review {entity_id}", assignee, due_at, False)
    async with pool.connection() as conn:
        await conn.execute(TASKS.statement().encode(), (TASKS.parameter([row]),))
    found: str = await scalar(
        pool, "SELECT id::text FROM tasks WHERE execution_id = %s", execution_id
    )
    return found


async def _seeded_execution(pool: AsyncConnectionPool[Any], entity_id: str) -> str:
    """A completed ``three-steps`` execution of ``entity_id`` (the workflow applied once)."""
    if not await scalar(pool, "SELECT count(*) FROM workflows WHERE name = 'three-steps'"):
        await apply(pool, THREE_STEPS)
    return await seed_execution(pool, entity_id=entity_id, completed_steps=3, status="completed")
