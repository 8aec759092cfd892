"""The operator's verbs on the command line, run as an operator runs them: processes, real
servers. ``workflows disable|enable|diff``, ``executions cancel|retry|prune``,
``pause|resume``: what they print, what they change, and one line on stderr when refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.definitions import Definitions
from tests.api_helpers import THREE_STEPS, seed_execution
from tests.ops_helpers import govflow, govflow_env
from tests.pipeline_helpers import apply, fetch, scalar

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(300)]

Result = subprocess.CompletedProcess[bytes]


def one_error_line(result: Result, status: int) -> str:
    """The run failed with ``status``, saying why in one line on stderr, and nothing else."""
    stderr = result.stderr.decode()
    assert result.returncode == status, stderr
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    assert line.startswith("govflow: ")
    return line


def ok(result: Result) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def run_all(env: dict[str, str], *commands: tuple[str, ...]) -> list[Result]:
    """Run independent commands at once (each process spends a second importing)."""
    results: list[Result | None] = [None] * len(commands)

    async def one(i: int, args: tuple[str, ...]) -> None:
        results[i] = await govflow(env, *args)

    async with anyio.create_task_group() as tg:
        for i, args in enumerate(commands):
            tg.start_soon(one, i, args)
    return [r for r in results if r is not None]


@pytest.fixture
def env(redis_server_url: str, database_url: str, prefix: str) -> dict[str, str]:
    return govflow_env(redis_server_url, database_url, prefix)


async def test_disable_enable_and_diff(
    env: dict[str, str], pool: AsyncConnectionPool[Any], tmp_path: Path
) -> None:
    other = THREE_STEPS.replace("three-steps", "other")
    await apply(pool, THREE_STEPS)
    await apply(pool, other)
    definitions = Definitions(pool)
    assert [wf.name for wf in await definitions.enabled()] == ["other", "three-steps"]
    same = tmp_path / "same.yaml"
    same.write_text(THREE_STEPS)
    changed = tmp_path / "changed.yaml"
    changed.write_text(other.replace("risk-team", "audit-team"))
    new = tmp_path / "new.yaml"
    new.write_text(THREE_STEPS.replace("three-steps", "fresh"))

    disabled = await govflow(env, "workflows", "disable", "three-steps")
    assert ok(disabled) == "three-steps v1 disabled\n"
    # The workers' cache sees it at their next batch: nothing matches it from now on.
    assert [wf.name for wf in await definitions.enabled()] == ["other"]
    again, unknown, diff, diff_json, exit_code, bad = await run_all(
        env,
        ("workflows", "disable", "three-steps"),
        ("workflows", "disable", "nope"),
        ("workflows", "diff", str(same), str(changed), str(new)),
        ("workflows", "diff", str(same), str(new), "--json"),
        ("workflows", "diff", str(same), "--exit-code"),
        ("workflows", "diff", str(tmp_path / "missing.yaml")),
    )
    assert ok(again) == "three-steps v1 disabled already\n"
    assert one_error_line(unknown, 1) == (
        "govflow: no workflow named 'nope' (see `govflow workflows list`)"
    )
    text = ok(diff)
    assert "three-steps: unchanged, v1 (disabled now" in text
    assert "other: apply makes v2" in text
    assert f"--- other v1 (stored)\n+++ {changed}\n" in text
    assert "\n-    assignee: risk-team\n+    assignee: audit-team\n" in text
    assert f"fresh: new; apply makes v1 ({new})" in text
    assert [
        (d["name"], d["state"], d["version"], d["enabled"]) for d in json.loads(diff_json.stdout)
    ] == [
        ("three-steps", "unchanged", 1, False),
        ("fresh", "new", None, None),
    ]
    assert exit_code.returncode == 0, exit_code.stderr
    assert one_error_line(bad, 2).endswith("missing.yaml: No such file or directory")

    changed_exit = await govflow(env, "workflows", "diff", str(changed), "--exit-code")
    assert changed_exit.returncode == 1
    enabled = await govflow(env, "workflows", "enable", "three-steps", "--json")
    assert json.loads(ok(enabled)) == {
        "name": "three-steps",
        "version": 1,
        "enabled": True,
        "changed": True,
    }
    assert [wf.name for wf in await definitions.enabled()] == ["other", "three-steps"]


async def test_cancel_retry_and_their_refusals(
    env: dict[str, str], pool: AsyncConnectionPool[Any]
) -> None:
    await apply(pool, THREE_STEPS)
    queued = await seed_execution(pool)
    completed = await seed_execution(pool, completed_steps=3, status="completed")

    cancelled, refused, unknown, wrong_state = await run_all(
        env,
        ("executions", "cancel", queued[:8], "--reason", "duplicate", "--actor", "alice", "--json"),
        ("executions", "cancel", completed),
        ("executions", "cancel", "0000000000"),
        ("executions", "retry", completed[:10]),
    )
    [done] = json.loads(ok(cancelled))["done"]
    assert (done["execution_id"], done["actor"], done["reason"], done["from_status"]) == (
        queued,
        "alice",
        "duplicate",
        "queued",
    )
    assert (
        one_error_line(refused, 1) == f"govflow: not cancelled: {completed[:8]}: already completed"
    )
    assert one_error_line(unknown, 1) == "govflow: no execution with id 0000000000"
    assert one_error_line(wrong_state, 1) == (
        f"govflow: not retried: {completed[:8]}: completed: nothing to retry"
    )
    assert (
        await scalar(pool, "SELECT status FROM workflow_executions WHERE id = %s::uuid", queued)
        == "cancelled"
    )

    shown = ok(await govflow(env, "executions", "show", queued))
    assert "cancelled by alice at " in shown
    assert "(was queued): duplicate" in shown
    listed = json.loads(
        ok(await govflow(env, "executions", "list", "--status", "cancelled", "--json"))
    )
    assert [e["id"] for e in listed] == [queued]


async def test_prune_and_pause(env: dict[str, str], pool: AsyncConnectionPool[Any]) -> None:
    await apply(pool, THREE_STEPS)
    old = await seed_execution(pool, completed_steps=3, status="completed")
    recent = await seed_execution(pool, completed_steps=3, status="completed")
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE workflow_executions SET finished_at = now() - interval '31 days'"
            " WHERE id = %s::uuid",
            (old,),
        )

    dry, bad, paused, unknown_group = await run_all(
        env,
        ("executions", "prune", "--older-than", "30d", "--dry-run", "--json"),
        ("executions", "prune", "--older-than", "soon"),
        ("pause", "actions", "--reason", "deploy", "--actor", "ops"),
        ("pause", "relay"),
    )
    report = json.loads(ok(dry))
    assert (report["dry_run"], report["executions"], report["dead_letters"]) == (
        True,
        {"completed": 1},
        0,
    )
    assert "--older-than: 'soon' is not a duration" in one_error_line(bad, 2)
    assert ok(paused).startswith("actions paused by ops since ")
    assert one_error_line(unknown_group, 2) == (
        "govflow: no group 'relay': the groups are triggers and actions"
    )

    pruned, lag = await run_all(
        env, ("executions", "prune", "--older-than", "30d"), ("lag", "--json")
    )
    assert ok(pruned) == "deleted 1 executions (completed 1) and 0 dead letters\n"
    remaining = await fetch(pool, "SELECT id::text FROM workflow_executions")
    assert remaining == [(recent,)]
    steps = "SELECT count(*) FROM execution_steps WHERE execution_id = %s::uuid"
    assert (await scalar(pool, steps, old), await scalar(pool, steps, recent)) == (0, 3)
    lagged = json.loads(ok(lag))
    assert [(p["group"], p["by"], p["reason"]) for p in lagged["paused"]] == [
        ("actions", "ops", "deploy")
    ]
    resumed = await govflow(env, "resume", "actions")
    assert ok(resumed).startswith("actions resumed (paused by ops since ")
