"""Workflows that wait for people, through the Python API, with a worker in this process.

An execution stops at a ``wait: true`` step, holding nothing on any stream; a decision
(``Decisions.decide``), a completion (``Decisions.complete_task``) or its deadline (the
deadline service of the actions worker) gives the approval or task its outcome, and the
worker runs the branch for it, then the remaining steps or nothing more.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from govflow.consumers.deadlines import Deadlines
from govflow.db.decisions import RefusedError
from govflow.operations.decisions import Decisions
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from govflow.schemas.workflows import Workflow
from tests.faults.servers import free_port, redis_server, scratch_dir
from tests.ops_helpers import govflow, govflow_env
from tests.pipeline_helpers import (
    apply,
    effect_counts,
    fetch,
    group_lag,
    publish,
    running_worker,
    scalar,
    stream_state,
    wait_for,
)

pytestmark = pytest.mark.anyio

# Steps: 1 the approval, 2 the task after it; the branches follow: 3 approved, 4 rejected,
# 5 expired.
APPROVAL = """
name: gate
entity: policy
trigger: create
actions:
  - create_approval:
      approvers: [alice, bob, carol]
      required: {required}
      due_in: {due_in}
      wait: true
      on_approved: [{{assign: {{assignee: approved-branch}}}}]
      on_rejected: [{{assign: {{assignee: rejected-branch}}}}]
      on_expired: [{{assign: {{assignee: expired-branch}}}}]
  - create_task: {{title: "Publish {{data.title}}"}}
"""
# Steps: 1 the task, 2 the assignment after it, 3 the expired branch.
TASK = """
name: evidence
entity: policy
trigger: create
actions:
  - create_task:
      title: "Attach evidence to {data.title}"
      due_in: 1s
      wait: true
      on_expired: [{assign: {assignee: overdue-desk}}]
  - assign: {assignee: publisher}
"""
NOW = 0.2  # the deadline service's interval where a test waits for a deadline


def approval(required: int | str = 2, due_in: str = "1h") -> str:
    return APPROVAL.format(required=required, due_in=due_in)


@asynccontextmanager
async def waiting(
    settings: Settings,
    pool: AsyncConnectionPool[Any],
    redis: Redis,
    workflow: str,
    n: int = 1,
    executions: int | None = None,
) -> AsyncIterator[list[str]]:
    """A worker running, and ``executions`` (``n`` events') waiting; yield their ids."""
    executions = executions or n
    await apply(pool, workflow)
    events = [new_event("policy.created", f"POL-{i}", data={"title": f"P{i}"}) for i in range(n)]
    async with running_worker(settings):
        await publish(redis, Keys(settings.prefix), events)
        await wait_for(
            lambda: scalar(
                pool, "SELECT count(*) FROM workflow_executions WHERE status = 'waiting'"
            ),
            lambda found: found == executions,
            within=30,
            what=f"{executions} executions waiting",
        )
        yield [row[0] for row in await fetch(pool, "SELECT id::text FROM workflow_executions")]


async def approval_id(pool: AsyncConnectionPool[Any]) -> str:
    return str(await scalar(pool, "SELECT id::text FROM approvals"))


async def task_id(pool: AsyncConnectionPool[Any]) -> str:
    return str(await scalar(pool, "SELECT id::text FROM tasks WHERE wait"))


async def finished(pool: AsyncConnectionPool[Any]) -> str:
    """Wait until the one execution is completed (or dead-lettered); return its status."""
    status: str = await wait_for(
        lambda: scalar(pool, "SELECT status FROM workflow_executions"),
        lambda s: s in ("completed", "dead_lettered"),
        within=30,
        what="the execution to finish",
    )
    return status


async def steps(pool: AsyncConnectionPool[Any]) -> dict[int, tuple[str, str, int]]:
    """The one execution's steps: number -> (action, status, attempts)."""
    rows = await fetch(pool, "SELECT step, action, status, attempts FROM execution_steps")
    return {step: (action, status, attempts) for step, action, status, attempts in rows}


async def assignees(pool: AsyncConnectionPool[Any]) -> list[tuple[int, str]]:
    return [
        (step, who)
        for step, who in await fetch(pool, "SELECT step, assignee FROM assignments ORDER BY step")
    ]


async def quiet(redis: Redis, keys: Keys) -> dict[str, int]:
    """What is in flight on the streams: nothing pending, undelivered or scheduled."""
    state = await stream_state(redis, keys)
    state["commands_undelivered"] = await group_lag(redis, keys.commands(), "actions")
    return state


QUIET = {
    "triggers_pending": 0,
    "actions_pending": 0,
    "retry_scheduled": 0,
    "dead_stream": 0,
    "commands_undelivered": 0,
}


async def test_a_waiting_execution_holds_nothing_on_any_stream(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    keys = Keys(settings.prefix)
    async with waiting(settings, pool, redis, approval()):
        await wait_for(lambda: quiet(redis, keys), lambda s: s == QUIET, within=10, what="quiet")
        assert await steps(pool) == {1: ("create_approval", "completed", 1)}
        row = await fetch(pool, "SELECT status, required, wait, due_at > now() FROM approvals")
        assert row == [("pending", 2, True, True)]


async def test_two_of_three_approve_then_the_branch_and_the_remaining_steps_run_once(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    async with waiting(settings, pool, redis, approval()), Decisions.connect(settings) as gf:
        aid = await approval_id(pool)
        first = await gf.decide(aid, by="alice", approve=True, comment="fine by me")
        assert first.status == "pending"
        assert [(d.by, d.decision, d.comment) for d in first.decisions] == [
            ("alice", "approve", "fine by me")
        ]
        assert await scalar(pool, "SELECT status FROM workflow_executions") == "waiting"

        second = await gf.decide(aid, by="carol", approve=True)
        assert (second.status, len(second.decisions)) == ("approved", 2)
        assert second.decided_at is not None
        assert await finished(pool) == "completed"
    assert await steps(pool) == {
        1: ("create_approval", "completed", 1),
        2: ("create_task", "completed", 1),
        3: ("assign", "completed", 1),
    }
    assert await assignees(pool) == [(3, "approved-branch")]
    assert (await effect_counts(pool))["tasks"] == 1


async def test_a_rejection_runs_its_branch_and_ends_the_execution(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    async with waiting(settings, pool, redis, approval()), Decisions.connect(settings) as gf:
        aid = await approval_id(pool)
        await gf.decide(aid, by="alice", approve=True)
        decided = await gf.decide(aid, by="bob", approve=False, comment="missing evidence")
        assert decided.status == "rejected"
        assert await finished(pool) == "completed"
    assert await steps(pool) == {
        1: ("create_approval", "completed", 1),
        4: ("assign", "completed", 1),
    }
    assert await assignees(pool) == [(4, "rejected-branch")]
    assert (await effect_counts(pool))["tasks"] == 0  # the step after the wait never ran


async def test_required_all_waits_for_every_approver(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    workflow = approval(required='"all"')
    async with waiting(settings, pool, redis, workflow), Decisions.connect(settings) as gf:
        aid = await approval_id(pool)
        assert await scalar(pool, "SELECT required FROM approvals") == 3
        for who in ("carol", "alice"):
            assert (await gf.decide(aid, by=who, approve=True)).status == "pending"
        assert (await gf.decide(aid, by="bob", approve=True)).status == "approved"
        assert await finished(pool) == "completed"
    assert await assignees(pool) == [(3, "approved-branch")]


async def test_refusals_name_their_reason_and_change_nothing(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    async with waiting(settings, pool, redis, approval()), Decisions.connect(settings) as gf:
        aid = await approval_id(pool)
        await gf.decide(aid, by="alice", approve=True)

        refusals: dict[str, RefusedError] = {}
        attempts: dict[str, tuple[str, str]] = {
            "twice": (aid, "alice"),
            "stranger": (aid, "mallory"),
            "unknown": ("6f1c2f9e-0000-4000-8000-000000000000", "alice"),
            "malformed": ("not-a-uuid", "alice"),
        }
        for name, (target, who) in attempts.items():
            with pytest.raises(RefusedError) as refused:
                await gf.decide(target, by=who, approve=False)
            refusals[name] = refused.value

        assert refusals["twice"].status == 409
        assert "alice has already decided" in refusals["twice"].reason
        assert refusals["stranger"].status == 422
        assert "'mallory' is not an approver" in refusals["stranger"].reason
        assert refusals["unknown"].status == 404
        assert refusals["malformed"].status == 404
        assert "not-a-uuid" in refusals["malformed"].reason
        # The one decision that counted is the first; the approval still waits.
        rows = await fetch(pool, 'SELECT "by", decision FROM approval_decisions')
        assert rows == [("alice", "approve")]
        assert await scalar(pool, "SELECT status FROM approvals") == "pending"
        assert await scalar(pool, "SELECT status FROM workflow_executions") == "waiting"


async def test_a_decision_after_the_due_time_is_refused_and_the_approval_expires(
    make_settings: Callable[..., Settings], pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    # The deadline service ticks once, at start: the decision is first to find it due.
    settings = make_settings(deadline_interval=3600)
    async with (
        waiting(settings, pool, redis, approval(due_in="1s")),
        Decisions.connect(settings) as gf,
    ):
        await wait_for(
            lambda: scalar(pool, "SELECT due_at <= now() FROM approvals"),
            bool,
            within=10,
            what="the due time to pass",
        )
        with pytest.raises(RefusedError) as refused:
            await gf.decide(await approval_id(pool), by="alice", approve=True)
        assert refused.value.status == 409
        assert "expired" in refused.value.reason
        assert await finished(pool) == "completed"
    assert await fetch(pool, "SELECT status FROM approvals") == [("expired",)]
    assert await fetch(pool, "SELECT count(*) FROM approval_decisions") == [(0,)]
    assert await assignees(pool) == [(5, "expired-branch")]
    assert set(await steps(pool)) == {1, 5}


async def test_a_completed_task_lets_the_remaining_steps_run(
    make_settings: Callable[..., Settings], pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    settings = make_settings(deadline_interval=3600)
    async with waiting(settings, pool, redis, TASK), Decisions.connect(settings) as gf:
        done = await gf.complete_task(await task_id(pool), by="owner")
        assert (done.status, done.completed_by) == ("done", "owner")
        assert await finished(pool) == "completed"
        with pytest.raises(RefusedError) as again:
            await gf.complete_task(done.id, by="owner")
        assert again.value.status == 409
    assert await assignees(pool) == [(2, "publisher")]
    assert set(await steps(pool)) == {1, 2}


async def test_an_expired_task_runs_its_branch_and_ends_the_execution(
    make_settings: Callable[..., Settings], pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    settings = make_settings(deadline_interval=NOW)
    async with waiting(settings, pool, redis, TASK):
        assert await finished(pool) == "completed"
    assert await fetch(pool, "SELECT status, completed_by FROM tasks") == [("expired", None)]
    assert await assignees(pool) == [(3, "overdue-desk")]
    assert set(await steps(pool)) == {1, 3}


async def test_a_resume_redis_never_got_is_put_back_by_the_reconciler(
    make_settings: Callable[..., Settings], pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    settings = make_settings(reconcile_after=1.0)
    keys = Keys(settings.prefix)
    async with waiting(settings, pool, redis, approval(required=1)):
        before = await redis.xlen(keys.commands())
        # Redis is out of reach for the decision: it commits in Postgres, and its
        # command is never emitted.
        async with Redis.from_url(f"redis://127.0.0.1:{free_port()}/0") as gone:
            decisions = Decisions(pool, gone, keys)
            decided = await decisions.decide(await approval_id(pool), by="bob", approve=True)
        assert decided.status == "approved"
        assert await scalar(pool, "SELECT status FROM workflow_executions") == "queued"
        assert await redis.xlen(keys.commands()) == before
        # Postgres says it has work to do: the reconciler emits its command again.
        assert await finished(pool) == "completed"
        assert await redis.xlen(keys.commands()) == before + 1
    assert await assignees(pool) == [(3, "approved-branch")]
    assert set(await steps(pool)) == {1, 2, 3}


async def test_deadlines_fired_while_redis_is_away_resume_at_the_next_tick(
    make_settings: Callable[..., Settings], pool: AsyncConnectionPool[Any]
) -> None:
    with scratch_dir("gf-redis-") as folder, redis_server(folder) as server:
        settings = make_settings(redis_url=server.url, deadline_interval=3600)
        keys = Keys(settings.prefix)
        async with Redis.from_url(server.url) as redis:
            async with waiting(settings, pool, redis, TASK):
                pass  # stopped: this test fires the deadline itself
            service = Deadlines(redis, pool, keys)
            await wait_for(
                lambda: scalar(pool, "SELECT due_at <= now() FROM tasks"),
                bool,
                within=10,
                what="the due time to pass",
            )
            server.kill()
            with pytest.raises(RedisConnectionError):
                await service.fire()
            assert await scalar(pool, "SELECT status FROM tasks") == "expired"
            assert await scalar(pool, "SELECT status FROM workflow_executions") == "queued"
            server.start()
            before = await redis.xlen(keys.commands())
            # Nothing more is due; the execution it could not resume goes out now.
            assert await service.fire() == 0
            assert await redis.xlen(keys.commands()) == before + 1
            async with running_worker(settings):
                assert await finished(pool) == "completed"
    assert await assignees(pool) == [(3, "overdue-desk")]


async def test_lag_counts_waiting_executions_and_deadlines_due(
    make_settings: Callable[..., Settings],
    pool: AsyncConnectionPool[Any],
    redis: Redis,
    redis_server_url: str,
    database_url: str,
) -> None:
    settings = make_settings(deadline_interval=3600)
    env = govflow_env(redis_server_url, database_url, settings.prefix)

    async def lag() -> dict[str, int]:
        result = await govflow(env, "lag", "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        return {k: doc[k] for k in ("waiting", "timers_due", "approvals_pending", "tasks_open")}

    await apply(pool, TASK)
    async with waiting(settings, pool, redis, approval(), n=2, executions=4):
        pass  # stopped: nothing fires the deadlines now
    await wait_for(
        lambda: scalar(pool, "SELECT bool_and(due_at <= now()) FROM tasks"),
        bool,
        within=10,
        what="the tasks' due time to pass",
    )
    assert await lag() == {"waiting": 4, "timers_due": 2, "approvals_pending": 2, "tasks_open": 2}
    # A worker comes up: its first tick fires what is due, and those executions end.
    async with running_worker(settings):
        await wait_for(lag, lambda n: n["timers_due"] == 0 and n["waiting"] == 2, within=30,
                       what="the deadlines to fire")  # fmt: skip
    assert await lag() == {"waiting": 2, "timers_due": 0, "approvals_pending": 2, "tasks_open": 0}


BAD_DEFINITIONS = {
    "wait-on-assign": (
        "actions: [{assign: {assignee: a, wait: true}}]",
        "action 1: only create_approval and create_task can wait, not assign",
    ),
    "branch-without-wait": (
        "actions: [{create_approval: {approvers: [a], on_approved: [{assign: {assignee: a}}]}}]",
        "action 1: on_approved needs `wait: true`",
    ),
    "expired-without-due": (
        "actions: [{create_task: {title: t, wait: true, on_expired: [{assign: {assignee: a}}]}}]",
        "action 1: on_expired needs a due time (due_in)",
    ),
    "nested-wait": (
        (
            "actions: [{create_approval: {approvers: [a], wait: true, on_rejected:"
            " [{create_task: {title: t, wait: true}}]}}]"
        ),
        "action 2 (in a branch of action 1): a branch's steps cannot wait or branch again",
    ),
    "too-many-required": (
        "actions: [{create_approval: {approvers: [a, b], required: 3, wait: true}}]",
        "required is 3, but only 2 approver(s) named",
    ),
}


async def test_apply_refuses_waits_that_cannot_work(
    redis_server_url: str, database_url: str, prefix: str, tmp_path: Path
) -> None:
    files = []
    for name, (actions, _) in BAD_DEFINITIONS.items():
        file = tmp_path / f"{name}.yaml"
        file.write_text(f"name: {name}\nentity: policy\ntrigger: create\n{actions}\n")
        files.append(str(file))

    result = await govflow(
        govflow_env(redis_server_url, database_url, prefix), "workflows", "apply", *files
    )

    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == len(BAD_DEFINITIONS), lines
    for line, path, (_, reason) in zip(lines, files, BAD_DEFINITIONS.values(), strict=True):
        assert line.startswith(f"govflow: {path}"), line
        assert reason in line, line


def test_branch_steps_are_numbered_after_the_actions_by_outcome() -> None:
    wf = Workflow(
        name="numbers",
        entity="policy",
        trigger="create",
        actions=[
            {"create_approval": {"approvers": ["a"], "wait": True, "due_in": "1d",
                                 "on_expired": [{"notify": {"webhook": "https://x.example"}}],
                                 "on_approved": [{"assign": {"assignee": "b"}}]}},
            {"assign": {"assignee": "c"}},
        ],
    )  # fmt: skip
    specs = {s.number: (s.action, s.branch_of) for s in wf.specs()}
    assert specs == {1: ("create_approval", None), 2: ("assign", None), 3: ("assign", 1),
                     4: ("notify", 1)}  # fmt: skip


async def test_an_id_in_another_spelling_of_its_uuid_is_the_same_approval_or_task(
    make_settings: Callable[..., Settings], pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    settings = make_settings(deadline_interval=3600)
    await apply(pool, approval(required=1))
    async with (
        waiting(settings, pool, redis, TASK, n=1, executions=2),
        Decisions.connect(settings) as gf,
    ):
        decided = await gf.decide(f"urn:uuid:{await approval_id(pool)}", by="bob", approve=True)
        assert decided.status == "approved"
        done = await gf.complete_task((await task_id(pool)).upper(), by="owner")
        assert done.status == "done"


async def test_a_decision_while_a_delivery_is_in_flight_still_resumes_the_execution(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    """A waiting execution redelivered (its worker died after the commit, before the ack)
    shows ``running`` when the decision lands: the decision emits its command all the
    same, rather than leave it to the reconciler."""
    keys = Keys(settings.prefix)
    async with waiting(settings, pool, redis, approval(required=1)):
        pass  # the worker stops; the execution waits
    status = "SELECT status FROM workflow_executions"
    await fetch(pool, "UPDATE workflow_executions SET status = 'running' RETURNING 1")
    commands = await redis.xlen(keys.commands())
    async with Decisions.connect(settings) as gf:
        await gf.decide(await approval_id(pool), by="alice", approve=True)
    assert await redis.xlen(keys.commands()) == commands + 1
    assert await scalar(pool, status) == "running"  # left to the delivery in flight
    async with running_worker(settings):
        assert await finished(pool) == "completed"
    assert await assignees(pool) == [(3, "approved-branch")]


async def test_the_approvals_of_a_cancelled_execution_take_no_decision(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    async with waiting(settings, pool, redis, approval()), Decisions.connect(settings) as gf:
        aid = await approval_id(pool)
        await fetch(pool, "UPDATE workflow_executions SET status = 'cancelled' RETURNING 1")
        with pytest.raises(RefusedError) as refused:
            await gf.decide(aid, by="alice", approve=True)
    assert refused.value.status == 409
    assert "cancelled" in refused.value.reason
    assert await fetch(pool, "SELECT count(*) FROM approval_decisions") == [(0,)]
