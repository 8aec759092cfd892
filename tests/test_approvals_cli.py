"""``govflow approvals`` and ``govflow tasks``: listing, deciding and completing, as an
operator runs them (each a ``govflow`` process against this test's servers)."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool

from govflow.db import decisions
from govflow.schemas import codec
from govflow.schemas.settings import Settings
from tests.decision_helpers import PAST, seed_approval, seed_task
from tests.ops_helpers import govflow, govflow_env
from tests.pipeline_helpers import running_worker, scalar, wait_for
from tests.test_deploy import readme_decision_loop

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(300)]

Result = subprocess.CompletedProcess[bytes]


def refused(result: Result) -> str:
    """The one stderr line of a command that exited 1 and printed nothing on stdout."""
    assert (result.returncode, result.stdout) == (1, b""), result
    (line,) = result.stderr.decode().splitlines()
    return line


async def test_listings_filter_and_print_what_the_api_answers(
    redis_server_url: str, database_url: str, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    decided = await seed_approval(pool, entity_id="POL-1", approvers=("ciso",))
    pending = await seed_approval(pool, entity_id="POL-2", approvers=("ciso", "cfo"), required=2)
    done = await seed_task(pool, assignee="user-17")
    task = await seed_task(pool, assignee="user-42", entity_id="POL-2")
    async with pool.connection() as conn, conn.transaction():
        await decisions.decide(conn, decided, by="ciso", approve=True, comment="fine by me")
        await decisions.complete_task(conn, done, by="user-17")
    env = govflow_env(redis_server_url, database_url, prefix)
    results: dict[str, Result] = {}

    async def run(name: str, *args: str) -> None:
        results[name] = await govflow(env, *args)

    # Read-only, so at once: each process spends seconds importing.
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "all", "approvals", "list", "--json")
        tg.start_soon(run, "approved", "approvals", "list", "--status", "approved", "--json")
        tg.start_soon(run, "cfo", "approvals", "list", "--approver", "cfo", "--json")
        tg.start_soon(run, "pol1", "approvals", "list", "--entity-id", "POL-1", "--json")
        tg.start_soon(run, "text", "approvals", "list")
        tg.start_soon(run, "bad", "approvals", "list", "--status", "maybe")
        tg.start_soon(run, "tasks", "tasks", "list", "--json")
        tg.start_soon(run, "open", "tasks", "list", "--status", "open", "--json")
        tg.start_soon(run, "user42", "tasks", "list", "--assignee", "user-42", "--json")
        tg.start_soon(run, "tasks_text", "tasks", "list")

    def ids(name: str) -> list[str]:
        assert results[name].returncode == 0, results[name].stderr
        return [row["id"] for row in json.loads(results[name].stdout)]

    assert ids("all") == [decided, pending]
    assert ids("approved") == [decided]
    assert ids("cfo") == [pending]
    assert ids("pol1") == [decided]
    assert ids("tasks") == [done, task]
    assert ids("open") == ids("user42") == [task]

    # Byte for byte the objects GET /approvals and GET /tasks hold (tests/test_approvals_api.py).
    async with pool.connection() as conn:
        approvals = await decisions.list_approvals(conn)
        tasks = await decisions.list_tasks(conn)
    assert results["all"].stdout == codec.encode(approvals) + b"\n"
    assert results["tasks"].stdout == codec.encode(tasks) + b"\n"
    first = json.loads(results["all"].stdout)[0]
    assert first["decisions"][0]["by"] == "ciso"
    assert first["decisions"][0]["comment"] == "fine by me"

    text = " ".join(results["text"].stdout.decode().split())
    for shown in (
        decided[:8],
        pending[:8],
        "three-steps step 3",
        "policy POL-2",
        "approvers: ciso, cfo",
    ):
        assert shown in text
    assert "ciso approved: fine by me" in text
    assert "approved 1/1" in text
    assert "pending 0/2" in text
    tasks_text = " ".join(results["tasks_text"].stdout.decode().split())
    assert "Review POL-2" in tasks_text
    assert "done by user-17" in tasks_text

    bad = results["bad"]
    assert bad.returncode == 2
    assert (
        "'maybe' is not one of 'pending', 'approved', 'rejected', 'expired'" in bad.stderr.decode()
    )


async def test_each_refusal_exits_1_with_its_reason(
    redis_server_url: str, database_url: str, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    quorum = await seed_approval(pool, approvers=("ciso", "cfo"), required=2)
    plain = await seed_approval(pool, approvers=("ciso",))
    overdue = await seed_approval(pool, approvers=("ciso",), due_in=PAST)
    task = await seed_task(pool)
    overdue_task = await seed_task(pool, due_in=PAST)
    missing = str(uuid.uuid4())
    env = govflow_env(redis_server_url, database_url, prefix)
    results: dict[str, Result] = {}

    async def chain(*steps: tuple[str, list[str]]) -> None:
        for name, args in steps:
            results[name] = await govflow(env, *args)

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            chain,
            ("first", ["approvals", "approve", quorum[:8], "--by", "ciso", "--comment", "ok"]),
            ("twice", ["approvals", "reject", quorum, "--by", "ciso"]),
            ("reject", ["approvals", "reject", quorum, "--by", "cfo", "--json"]),
            ("after", ["approvals", "approve", quorum, "--by", "cfo"]),
        )
        tg.start_soon(
            chain,
            ("stranger", ["approvals", "approve", plain, "--by", "intern"]),
            ("expired", ["approvals", "approve", overdue, "--by", "ciso"]),
            ("missing", ["approvals", "reject", missing, "--by", "ciso"]),
        )
        tg.start_soon(
            chain,
            ("complete", ["tasks", "complete", task[:8], "--by", "user-17"]),
            ("again", ["tasks", "complete", task, "--by", "user-17"]),
            ("late", ["tasks", "complete", overdue_task, "--by", "user-17"]),
            ("no_task", ["tasks", "complete", "0000", "--by", "user-17"]),
        )

    first = results["first"]
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().strip() == (
        f"ciso approved {quorum}: the approval is pending (1 of 2 approvals)"
    )
    assert refused(results["twice"]) == f"govflow: ciso has already decided on approval {quorum}"
    assert results["reject"].returncode == 0, results["reject"].stderr
    rejected = json.loads(results["reject"].stdout)
    assert (rejected["id"], rejected["status"]) == (quorum, "rejected")
    assert [(d["by"], d["decision"], d["comment"]) for d in rejected["decisions"]] == [
        ("ciso", "approve", "ok"),
        ("cfo", "reject", None),
    ]
    assert refused(results["after"]) == f"govflow: approval {quorum} is already rejected"
    assert refused(results["stranger"]) == (
        f"govflow: 'intern' is not an approver of {plain} (ciso)"
    )
    assert refused(results["expired"]) == f"govflow: approval {overdue} expired at its due time"
    assert refused(results["missing"]) == f"govflow: no approval with id {missing}"

    assert results["complete"].returncode == 0, results["complete"].stderr
    assert results["complete"].stdout.decode().strip() == f"task {task} done by user-17"
    assert refused(results["again"]) == f"govflow: task {task} is already done"
    assert refused(results["late"]) == f"govflow: task {overdue_task} expired at its due time"
    assert refused(results["no_task"]) == "govflow: no task with id 0000"

    statuses = await scalar(pool, "SELECT array_agg(status ORDER BY created_at) FROM approvals")
    assert statuses == ["rejected", "pending", "expired"]


async def test_the_readme_loop_from_publish_to_decision(
    make_settings: Callable[..., Settings], pool: AsyncConnectionPool[Any]
) -> None:
    settings = make_settings()
    assert settings.redis_url is not None
    assert settings.database_url is not None
    env = govflow_env(settings.redis_url, settings.database_url, settings.prefix)
    apply, publish, listing, approve, show = readme_decision_loop()

    async def ok(argv: list[str]) -> str:
        assert argv[0] == "govflow"
        result = await govflow(env, *argv[1:])
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    await ok(apply)  # the README runs from the repository's root, as these commands do
    async with running_worker(settings):
        await ok(publish)
        await wait_for(
            lambda: scalar(
                pool, "SELECT count(*) FROM workflow_executions WHERE status = 'waiting'"
            ),
            lambda n: n == 1,
            within=30,
            what="the execution waiting for its approval",
        )
        (approval,) = json.loads(await ok([*listing, "--json"]))
        assert approval["status"] == "pending"
        assert (approval["entity_id"], approval["approvers"]) == (
            "POL-7",
            ["compliance-officer", "ciso"],
        )
        # The README's ids are examples: this run's are the ones the listing shows.
        said = await ok([*approve[:3], approval["id"][:8], *approve[4:]])
        assert said.strip().endswith(
            f"the approval is approved (1 of 1 approvals); execution"
            f" {approval['execution_id'][:8]} goes on"
        )
        await wait_for(
            lambda: scalar(pool, "SELECT status FROM workflow_executions"),
            lambda s: s == "completed",
            within=30,
            what="the execution going on after the approval",
        )
    shown = json.loads(await ok([*show[:3], approval["execution_id"][:8], "--json"]))
    assert (shown["status"], shown["workflow_name"]) == ("completed", "high-risk-policy-approval")
    (task,) = json.loads(await ok(["govflow", "tasks", "list", "--assignee", "user-17", "--json"]))
    assert (task["title"], task["status"]) == ("Publish Access control", "open")
    changed = await scalar(pool, "SELECT array_agg(to_status) FROM status_changes")
    assert changed == ["approved"]  # on_approved ran, on_rejected did not
