"""Cancel and retry executions through the whole pipeline: a real worker, a real webhook.

A cancel that lands while a worker is half-way through an execution (its webhook in
flight) must leave the worker nothing to write; a retry must run the steps that did not
complete, once, whether the execution was cancelled or dead-lettered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.consumers import pause
from govflow.operations import interventions
from govflow.operations.lag import read_lag
from govflow.producers.publish import Publisher
from govflow.schemas.commands import execution_id
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.pipeline_helpers import apply, fetch, running_worker, scalar, wait_for
from tests.test_fencing import fenced_total

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WORKFLOW = """
name: review
entity: policy
trigger: create
actions:
  - create_task: {{title: "Review {{data.title}}"}}
  - notify: {{webhook: "{url}", message: "{{data.title}} is under review"}}
"""


class Hook:
    """A loopback webhook receiver: answers ``status``; holds each request while ``gate``
    is clear, and says when one arrived."""

    def __init__(self) -> None:
        self.status = 200
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.arrived = threading.Event()
        self.url = ""


@pytest.fixture
def hook() -> Iterator[Hook]:
    receiver = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.arrived.set()
            receiver.gate.wait(30)
            receiver.calls += 1
            self.send_response(receiver.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.gate.set()
        server.shutdown()
        server.server_close()


async def status_of(pool: AsyncConnectionPool[Any], exec_id: str) -> str:
    """The execution's status; ``none`` before its row exists."""
    rows = await fetch(pool, "SELECT status FROM workflow_executions WHERE id = %s::uuid", exec_id)
    return str(rows[0][0]) if rows else "none"


async def effects(pool: AsyncConnectionPool[Any], exec_id: str) -> tuple[int, int]:
    """(tasks, notifications) rows of the execution."""
    tasks = await scalar(pool, "SELECT count(*) FROM tasks WHERE execution_id = %s::uuid", exec_id)
    sent = await scalar(
        pool, "SELECT count(*) FROM notifications WHERE execution_id = %s::uuid", exec_id
    )
    return int(tasks), int(sent)


async def drained(redis: Redis, keys: Keys) -> bool:
    report = await read_lag(redis, None, keys)
    actions = next(g for g in report.groups if g.group == "actions")
    return actions.lag == 0 and actions.pending == 0


async def test_a_cancel_mid_execution_fences_the_worker_and_a_retry_finishes_it(
    make_settings: Callable[..., Settings],
    pool: AsyncConnectionPool[Any],
    redis: Redis,
    prefix: str,
    hook: Hook,
) -> None:
    keys = Keys(prefix)
    await apply(pool, WORKFLOW.format(url=hook.url))
    event = new_event("policy.created", "POL-7", data={"title": "Access control"})
    exec_id = execution_id(event.tenant, event.id, "review")
    hook.gate.clear()  # the webhook hangs until the cancel has landed
    fenced_before = fenced_total()

    async with running_worker(make_settings(), concurrency=1):
        await Publisher(redis, keys).publish(event)
        await anyio.to_thread.run_sync(hook.arrived.wait, 30)
        assert await status_of(pool, exec_id) == "running"
        # Two operators at once: it is cancelled once.
        reports: list[interventions.InterventionReport] = []

        async def cancel(actor: str) -> None:
            reports.append(
                await interventions.cancel(pool, [exec_id], actor=actor, reason="wrong policy")
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel, "alice")
            tg.start_soon(cancel, "bob")
        [done] = [r for r in reports if r.done]
        [other] = [r for r in reports if r.refused]
        assert other.refused[0].why == "already cancelled"
        assert done.done[0].from_status == "running"

        hook.gate.set()  # the webhook answers; the worker's transaction is refused
        # Its entry is left to whoever claims it next (after GOVFLOW_CLAIM_IDLE), which
        # finds the execution cancelled and acknowledges it without running anything.
        await wait_for(lambda: drained(redis, keys), bool, within=30, what="the entry settled")

    assert await status_of(pool, exec_id) == "cancelled"
    assert await effects(pool, exec_id) == (0, 0)  # nothing committed after the cancel
    assert fenced_total() == fenced_before + 1
    assert hook.calls == 1

    # The retry runs it again from step 1 (none completed), once.
    async with running_worker(make_settings(), concurrency=1):
        report = await interventions.retry(
            redis, pool, keys, [exec_id], actor="carol", reason="policy fixed"
        )
        assert [(d.kind, d.from_status) for d in report.done] == [("retry", "cancelled")]
        await wait_for(
            lambda: status_of(pool, exec_id), lambda s: s == "completed", within=30, what="done"
        )
    assert await effects(pool, exec_id) == (1, 1)
    history = await fetch(
        pool,
        "SELECT kind, from_status, actor, reason FROM execution_interventions ORDER BY id",
    )
    assert history[0][1:] == ("running", done.actor, "wrong policy")
    assert history[1:] == [("retry", "cancelled", "carol", "policy fixed")]


async def test_retry_of_a_dead_lettered_execution_replays_its_letter_once(
    make_settings: Callable[..., Settings],
    pool: AsyncConnectionPool[Any],
    redis: Redis,
    prefix: str,
    hook: Hook,
) -> None:
    keys = Keys(prefix)
    await apply(pool, WORKFLOW.format(url=hook.url))
    event = new_event("policy.created", "POL-8", data={"title": "Vendor risk"})
    exec_id = execution_id(event.tenant, event.id, "review")
    hook.status = 500
    settings = make_settings(max_attempts=1)
    async with running_worker(settings, concurrency=1):
        await Publisher(redis, keys).publish(event)
        await wait_for(
            lambda: status_of(pool, exec_id),
            lambda s: s == "dead_lettered",
            within=30,
            what="the execution dead-lettered",
        )
        assert await effects(pool, exec_id) == (1, 0)  # step 1 committed, step 2 failed
        hook.status = 200
        # Both at once: the dead letter is replayed once.
        reports: list[interventions.InterventionReport] = []

        async def retry(actor: str) -> None:
            reports.append(
                await interventions.retry(redis, pool, keys, [exec_id], actor=actor, reason="ok")
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(retry, "alice")
            tg.start_soon(retry, "bob")
        [done] = [r.done[0] for r in reports if r.done]
        [refused] = [r.refused[0] for r in reports if r.refused]
        assert refused.why.startswith(f"its dead letter {done.dead_letter_id}: ")
        await wait_for(
            lambda: status_of(pool, exec_id), lambda s: s == "completed", within=30, what="done"
        )
    assert await effects(pool, exec_id) == (1, 1)  # step 1 was not run again
    assert hook.calls == 2
    [(replayed_by, reason)] = await fetch(
        pool,
        "SELECT replayed_by, replay_reason FROM dead_letters WHERE id = %s",
        done.dead_letter_id,
    )
    assert (replayed_by, reason) == (done.actor, "ok")
    after = await interventions.retry(redis, pool, keys, [exec_id], actor="x", reason=None)
    assert [r.why for r in after.refused] == ["completed: nothing to retry"]


async def test_a_paused_group_reads_nothing_until_resumed(
    make_settings: Callable[..., Settings],
    pool: AsyncConnectionPool[Any],
    redis: Redis,
    prefix: str,
    hook: Hook,
) -> None:
    keys = Keys(prefix)
    await apply(pool, WORKFLOW.format(url=hook.url))
    events = [new_event("policy.created", f"POL-{n}", data={"title": "t"}) for n in range(3)]
    ids = [execution_id(e.tenant, e.id, "review") for e in events]
    paused = pause.Pause(group="actions", by="ops", since=datetime.now(UTC), reason="deploy")
    await pause.pause(redis, keys, paused)
    async with running_worker(make_settings(), concurrency=2):
        await Publisher(redis, keys).publish_many(events)

        async def statuses() -> list[str]:
            return [await status_of(pool, i) for i in ids]

        # The trigger matcher runs: the executions are recorded, and stay queued.
        await wait_for(statuses, lambda s: s == ["queued"] * 3, within=30, what="3 queued")
        report = await read_lag(redis, pool, keys)
        actions = next(g for g in report.groups if g.group == "actions")
        assert (actions.paused, actions.lag, actions.pending) == (True, 3, 0)
        assert [p.group for p in report.paused] == ["actions"]
        await anyio.sleep(2 * pause.CHECK_S)  # the consumers looked again, and still read nothing
        assert await statuses() == ["queued"] * 3

        assert await pause.resume(redis, keys, "actions") == paused
        await wait_for(statuses, lambda s: s == ["completed"] * 3, within=30, what="3 completed")
    assert hook.calls == 3
