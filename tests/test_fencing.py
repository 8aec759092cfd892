"""Fencing tokens on executions, on two real connections: the newer delivery wins.

Each connection plays one worker: it locks and claims the execution (its delivery's
token), then writes in a transaction that first holds the token. The older token is
refused, and its writes never happen; a terminal execution is never claimed again, except
by a replay. A delivery that runs whole in the transaction that locked it is started by
its final write, and fences off an older one all the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from structlog.testing import capture_logs

from govflow.consumers.actions import ActionRunner, open_clients
from govflow.consumers.definitions import Definitions
from govflow.consumers.outcomes import RetryPolicy
from govflow.consumers.streams import COMMAND_FIELD, Entry
from govflow.db import executions, fencing
from govflow.db.executions import NewExecution
from govflow.db.workflows import apply_workflow
from govflow.schemas.codec import decode_workflow, encode
from govflow.schemas.commands import RunWorkflow, execution_id
from govflow.schemas.events import new_event
from govflow.schemas.settings import Settings
from tests.faults.receiver import receiving

pytestmark = pytest.mark.anyio

WORKFLOW = """\
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
"""
NOTIFY = """\
name: notify
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - notify: {webhook: "URL", message: "{data.title} needs review"}
"""


Workers = tuple[AsyncConnection[Any], AsyncConnection[Any]]


@pytest.fixture
async def two_workers(database_url: str) -> AsyncIterator[Workers]:
    """Two connections of their own, each playing one worker."""
    async with (
        await AsyncConnection.connect(database_url) as one,
        await AsyncConnection.connect(database_url) as other,
    ):
        yield one, other


async def queued_execution(pool: AsyncConnectionPool[Any]) -> str:
    """A new execution of a one-step workflow, queued."""
    exec_id = execution_id("acme", "ev-1", "review")
    async with pool.connection() as conn:
        await apply_workflow(conn, decode_workflow(WORKFLOW))
        await executions.insert_queued(
            conn,
            [
                NewExecution(
                    exec_id, "review", 1, "ev-1", "policy", "POL-1", "acme", datetime.now(UTC)
                )
            ],
        )
    return exec_id


async def status_of(pool: AsyncConnectionPool[Any], exec_id: str) -> tuple[str, int, int]:
    """(status, attempts, completed steps) of the execution."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status, attempts, (SELECT count(*) FROM execution_steps s"
            " WHERE s.execution_id = e.id AND s.status = 'completed')"
            " FROM workflow_executions e WHERE id = %s",
            (exec_id,),
        )
        row = await cur.fetchone()
    assert row is not None
    return row[0], row[1], row[2]


async def start(
    conn: AsyncConnection[Any], ids: list[str], *, replays: list[str] | None = None
) -> dict[str, int]:
    """Start deliveries as a worker about to call the outside world does: lock, claim and
    commit; their tokens."""
    async with conn.transaction():
        return await fencing.claim(
            conn, (await fencing.lock(conn, ids, replays=replays or [])).epochs
        )


async def claimed_twice(
    stale: AsyncConnection[Any], owner: AsyncConnection[Any], exec_id: str
) -> tuple[int, int]:
    """The epochs of two deliveries of one execution: the stalled one's, then the owner's."""
    old = (await start(stale, [exec_id]))[exec_id]
    new = (await start(owner, [exec_id]))[exec_id]
    return old, new


class Fenced(Exception):  # noqa: N818 - what a worker's write is told, not an error
    """A transaction held stale tokens; ``ids`` are the executions refused."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__(f"{len(ids)} execution(s) started by a newer delivery")
        self.ids = frozenset(ids)


async def check(conn: AsyncConnection[Any], tokens: dict[str, int]) -> None:
    """``fencing.hold`` the tokens, or raise ``Fenced`` naming the executions refused."""
    refused = await fencing.hold(conn, tokens)
    if refused:
        raise Fenced(refused)


async def complete(conn: AsyncConnection[Any], exec_id: str, epoch: int) -> None:
    """What a worker writes when its delivery's step succeeded: all of it, under its token."""
    async with conn.transaction():
        await check(conn, {exec_id: epoch})
        await executions.complete_steps(conn, [(exec_id, 1, "create_task")])
        await executions.finish(conn, [exec_id])


async def dead_letter(conn: AsyncConnection[Any], exec_id: str, epoch: int) -> None:
    """What a worker writes when its delivery failed for good, under its token."""
    async with conn.transaction():
        await check(conn, {exec_id: epoch})
        await executions.fail_step(conn, exec_id, 1, "create_task", "410 Gone")
        await executions.set_failed(conn, exec_id, "dead_lettered", "410 Gone")


async def test_the_newer_delivery_wins_and_the_older_one_writes_nothing(
    pool: AsyncConnectionPool[Any], two_workers: Workers
) -> None:
    exec_id = await queued_execution(pool)
    stale, owner = two_workers
    old, new = await claimed_twice(stale, owner, exec_id)
    assert new == old + 1
    await complete(owner, exec_id, new)
    # The stalled worker wakes up with a failure: its whole transaction is refused.
    with pytest.raises(Fenced) as refused:
        await dead_letter(stale, exec_id, old)
    assert refused.value.ids == {exec_id}
    assert await status_of(pool, exec_id) == ("completed", 2, 1)


async def test_a_stale_token_is_refused_even_before_the_owner_writes(
    pool: AsyncConnectionPool[Any], two_workers: Workers
) -> None:
    exec_id = await queued_execution(pool)
    stale, owner = two_workers
    old, new = await claimed_twice(stale, owner, exec_id)
    with pytest.raises(Fenced):
        await complete(stale, exec_id, old)
    assert await status_of(pool, exec_id) == ("running", 2, 0)
    await complete(owner, exec_id, new)
    assert await status_of(pool, exec_id) == ("completed", 2, 1)


async def test_a_claim_waits_for_the_holder_then_finds_the_execution_finished(
    pool: AsyncConnectionPool[Any], two_workers: Workers
) -> None:
    exec_id = await queued_execution(pool)
    claimed: list[dict[str, int]] = []
    first, second = two_workers
    epoch = (await start(first, [exec_id]))[exec_id]

    async def claim_meanwhile() -> None:
        claimed.append(await start(second, [exec_id]))

    async with anyio.create_task_group() as tg, first.transaction():
        assert await fencing.hold(first, {exec_id: epoch}) == set()
        tg.start_soon(claim_meanwhile)
        await anyio.sleep(0.3)
        assert claimed == []  # it waits for the holder's commit
        await executions.complete_steps(first, [(exec_id, 1, "create_task")])
        await executions.finish(first, [exec_id])
    assert claimed == [{}]  # completed under the first token: nothing left to claim
    assert await status_of(pool, exec_id) == ("completed", 1, 1)


async def test_a_terminal_execution_is_claimed_again_only_by_a_replay(
    pool: AsyncConnectionPool[Any],
) -> None:
    exec_id = await queued_execution(pool)
    async with pool.connection() as conn:
        epoch = (await start(conn, [exec_id]))[exec_id]
        await dead_letter(conn, exec_id, epoch)
        assert await start(conn, [exec_id]) == {}
        replayed = await start(conn, [exec_id], replays=[exec_id])
        assert replayed == {exec_id: epoch + 1}
        await complete(conn, exec_id, epoch + 1)
        assert await start(conn, [exec_id], replays=[exec_id]) == {}
    assert await status_of(pool, exec_id) == ("completed", 2, 1)


async def test_a_delivery_started_by_its_final_write_fences_off_an_older_one(
    pool: AsyncConnectionPool[Any], two_workers: Workers
) -> None:
    exec_id = await queued_execution(pool)
    stale, owner = two_workers
    old = (await start(stale, [exec_id]))[exec_id]
    # The owner locks, runs and records in one transaction: no claim, one row update.
    async with owner.transaction():
        locked = (await fencing.lock(owner, [exec_id])).epochs
        assert locked == {exec_id: old}
        assert await fencing.hold(owner, locked) == set()
        await executions.complete_steps(owner, [(exec_id, 1, "create_task")])
        await executions.finish(owner, [exec_id], started=True)
        cur = await owner.execute(
            "SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'workflow_executions'"
        )
        assert await cur.fetchone() == (1,)
    with pytest.raises(Fenced):
        await dead_letter(stale, exec_id, old)
    cur = await owner.execute("SELECT epoch FROM workflow_executions WHERE id = %s", (exec_id,))
    assert await cur.fetchone() == (old + 1,)  # moved on, as a claim would have moved it
    assert await status_of(pool, exec_id) == ("completed", 2, 1)


async def test_hold_refuses_only_the_stale_executions_of_a_batch(
    pool: AsyncConnectionPool[Any],
) -> None:
    first = await queued_execution(pool)
    second = execution_id("acme", "ev-2", "review")
    async with pool.connection() as conn:
        await executions.insert_queued(
            conn,
            [
                NewExecution(
                    second, "review", 1, "ev-2", "policy", "POL-2", "acme", datetime.now(UTC)
                )
            ],
        )
        tokens = await start(conn, [first, second])
        await start(conn, [second])  # a newer delivery of the second
        async with conn.transaction():
            assert await fencing.hold(conn, tokens) == {second}


async def test_an_action_worker_overtaken_mid_webhook_writes_nothing_and_says_so(
    pool: AsyncConnectionPool[Any], database_url: str
) -> None:
    exec_id = execution_id("acme", "ev-1", "notify")
    event = new_event("policy.created", "POL-1", data={"title": "Policy 1"})

    def overtaken(path: str, key: str, n: int) -> float:
        # While the webhook is in flight, another worker starts the execution and finishes it.
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute(
                "UPDATE workflow_executions SET epoch = epoch + 1, status = 'completed'"
                " WHERE id = %s",
                (exec_id,),
            )
        return 0.0

    with receiving(overtaken, lambda path, key, n: 410) as hooks:
        async with pool.connection() as conn:
            workflow = NOTIFY.replace("URL", hooks.url("/hook"))
            version, _ = await apply_workflow(conn, decode_workflow(workflow))
            await executions.insert_queued(
                conn,
                [
                    NewExecution(
                        exec_id, "notify", 1, event.id, "policy", "POL-1", "acme", event.occurred_at
                    )
                ],
            )
        command = RunWorkflow(
            execution_id=exec_id, workflow_name="notify", workflow_version=version, event=event
        )
        entry = Entry(stream="commands", id="1-0", fields={COMMAND_FIELD: encode(command)})
        before = fenced_total()
        async with open_clients(5.0, frozenset({"127.0.0.1"})) as both:
            runner = ActionRunner(
                pool,
                Definitions(pool),
                RetryPolicy(),
                Settings(webhook_allowed_hosts="127.0.0.1"),
                both,
            )
            with capture_logs() as logs:
                [outcome] = await runner.handle([entry])
        assert hooks.count("/hook") == 1

    assert outcome.kind == "fenced"
    assert fenced_total() == before + 1
    [line] = [log for log in logs if log["event"] == "execution.fenced"]
    assert line["execution_id"] == exec_id
    # The 410 dead-lettered nothing: the step rows and effects of the stale try are gone.
    assert await status_of(pool, exec_id) == ("completed", 1, 0)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM execution_steps) + (SELECT count(*) FROM tasks)"
            " + (SELECT count(*) FROM dead_letters)"
        )
        assert await cur.fetchone() == (0,)


def fenced_total() -> float:
    return REGISTRY.get_sample_value("govflow_executions_fenced_total") or 0.0


async def hold_row(conn: AsyncConnection[Any], exec_id: str) -> None:
    """Lock the execution's row in an open transaction, as a worker frozen mid-write does."""
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1 FROM workflow_executions WHERE id = %s FOR UPDATE", (exec_id,))


async def test_lock_names_busy_a_row_held_past_its_patience_and_waits_for_one_released(
    pool: AsyncConnectionPool[Any], two_workers: Workers
) -> None:
    exec_id = await queued_execution(pool)
    holder, worker = two_workers
    await hold_row(holder, exec_id)
    started = anyio.current_time()
    async with worker.transaction():
        assert await fencing.lock(worker, [exec_id], patience=0.3) == ({}, frozenset({exec_id}))
    assert anyio.current_time() - started >= 0.3  # it kept trying before giving up

    async def release_soon() -> None:
        await anyio.sleep(0.2)
        await holder.execute("COMMIT")

    async with anyio.create_task_group() as tg, worker.transaction():
        tg.start_soon(release_soon)
        locked = await fencing.lock(worker, [exec_id], patience=5.0)
    assert locked == ({exec_id: 0}, frozenset())


async def test_an_execution_held_elsewhere_is_retried_without_an_attempt_and_the_batch_goes_on(
    pool: AsyncConnectionPool[Any], two_workers: Workers
) -> None:
    held = await queued_execution(pool)
    free = execution_id("acme", "ev-2", "review")
    event = new_event("policy.created", "POL-2", data={"title": "Policy 2"})
    async with pool.connection() as conn:
        await executions.insert_queued(
            conn,
            [
                NewExecution(
                    free, "review", 1, event.id, "policy", "POL-2", "acme", event.occurred_at
                )
            ],
        )
    entries = [
        Entry(
            stream="commands",
            id=f"{n}-0",
            fields={
                COMMAND_FIELD: encode(
                    RunWorkflow(
                        execution_id=exec_id,
                        workflow_name="review",
                        workflow_version=1,
                        event=event,
                    )
                )
            },
        )
        for n, exec_id in enumerate([held, free], start=1)
    ]
    holder, _ = two_workers
    await hold_row(holder, held)
    async with open_clients(5.0, frozenset()) as both:
        runner = ActionRunner(pool, Definitions(pool), RetryPolicy(), Settings(), both)
        busy, done = await runner.handle(entries)
        assert done.kind == "ack"
        assert (busy.kind, busy.cause, busy.counts) == ("retry", "busy", False)
        assert busy.execution_id == held
        assert await status_of(pool, free) == ("completed", 1, 1)
        assert await status_of(pool, held) == ("queued", 0, 0)  # not started, not counted
        await holder.execute("COMMIT")
        [again] = await runner.handle(entries[:1])
    assert again.kind == "ack"
    assert await status_of(pool, held) == ("completed", 1, 1)
