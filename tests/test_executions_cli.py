"""``govflow executions list|show``: executions with their steps, as people and tools read them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool

from govflow.db import executions, fencing
from govflow.db.executions import NewExecution
from govflow.db.views import read_execution
from govflow.db.workflows import apply_workflow
from govflow.schemas import codec
from govflow.schemas.codec import decode_workflow
from govflow.schemas.commands import execution_id
from tests.ops_helpers import govflow, govflow_env

pytestmark = pytest.mark.anyio

WORKFLOW = """\
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - assign: {assignee: risk-team}
  - notify: {webhook: "https://hooks.example.org/grc"}
"""


async def make_executions(pool: AsyncConnectionPool[Any]) -> tuple[str, str, str]:
    """One execution completed, one dead-lettered at step 2 of 3, one queued."""
    done, dead, queued = (execution_id("default", f"ev-{n}", "review") for n in range(3))
    now = datetime.now(UTC)
    async with pool.connection() as conn:
        await apply_workflow(conn, decode_workflow(WORKFLOW))
        await executions.insert_queued(
            conn,
            [
                NewExecution(i, "review", 1, f"ev-{n}", "policy", f"POL-{n}", "acme", now)
                for n, i in enumerate((done, dead, queued))
            ],
        )
        await fencing.claim(conn, (await fencing.lock(conn, [done, dead])).epochs)
        await executions.complete_steps(
            conn, [(done, 1, "create_task"), (done, 2, "assign"), (done, 3, "notify")]
        )
        await executions.finish(conn, [done])
        await executions.complete_steps(conn, [(dead, 1, "create_task")])
        await executions.fail_step(conn, dead, 2, "assign", "step 2: boom")
        await executions.set_failed(conn, dead, "dead_lettered", "step 2: boom")
    return done, dead, queued


async def test_detail_lists_every_step_of_the_version(pool: AsyncConnectionPool[Any]) -> None:
    _, dead, queued = await make_executions(pool)
    async with pool.connection() as conn:
        detail = await read_execution(conn, dead)
        fresh = await read_execution(conn, queued)
        missing = await read_execution(conn, execution_id("default", "nope", "review"))
    assert detail is not None
    assert (detail.status, detail.completed_steps, detail.total_steps) == ("dead_lettered", 1, 3)
    assert (detail.progress.step, detail.progress.text) == (2, "step 2 of 3")
    assert [(s.step, s.of, s.action, s.status, s.attempts, s.error) for s in detail.steps] == [
        (1, 3, "create_task", "completed", 1, None),
        (2, 3, "assign", "failed", 1, "step 2: boom"),
        (3, 3, "notify", "pending", 0, None),
    ]
    assert fresh is not None
    assert [s.status for s in fresh.steps] == ["pending"] * 3
    assert missing is None


@pytest.mark.slow
@pytest.mark.timeout(300)  # three processes importing at once on a busy machine
async def test_the_executions_commands(
    redis_server_url: str, database_url: str, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    _, dead, _ = await make_executions(pool)
    env = govflow_env(redis_server_url, database_url, prefix)
    results: dict[str, Any] = {}

    async def run(name: str, *args: str) -> None:
        results[name] = await govflow(env, "executions", *args)

    # Read-only, so at once: each process spends seconds importing.
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            run, "list", "list", "--status", "dead_lettered", "--entity-id", "POL-1",
            "--workflow", "review", "--json",
        )  # fmt: skip
        tg.start_soon(run, "show", "show", dead)
        tg.start_soon(run, "show_json", "show", dead, "--json")
        tg.start_soon(run, "missing", "show", "no-such-id")

    for name in ("list", "show", "show_json"):
        assert results[name].returncode == 0, results[name].stderr

    [row] = json.loads(results["list"].stdout)
    assert (row["id"], row["status"], row["last_error"]) == (dead, "dead_lettered", "step 2: boom")
    assert (row["workflow_name"], row["entity_id"], row["total_steps"]) == ("review", "POL-1", 3)

    # What GET /executions/{id} answers, byte for byte (tests/test_api.py holds the API to it);
    # the list holds the same view, as GET /executions does.
    async with pool.connection() as conn:
        view = await read_execution(conn, dead)
    assert results["list"].stdout == codec.encode([view]) + b"\n"
    assert results["show_json"].stdout == codec.encode(view) + b"\n"
    shown = json.loads(results["show_json"].stdout)
    assert (shown["completed_steps"], shown["total_steps"], shown["progress"]["text"]) == (
        1,
        3,
        "step 2 of 3",
    )

    text = results["show"].stdout.decode()
    assert f"execution {dead}: review v1 for policy POL-1 (tenant acme)" in text
    assert "dead_lettered, 1 of 3 steps completed" in text
    for line in ("1 of 3 │ create_task │ completed", "2 of 3 │ assign │ failed", "3 of 3 │ notify"):
        assert " ".join(line.split()) in " ".join(text.split())
    assert "step 2: boom" in text

    missing = results["missing"]
    assert missing.returncode == 1
    assert missing.stdout == b""
    assert missing.stderr.decode().splitlines() == ["govflow: no execution with id no-such-id"]
