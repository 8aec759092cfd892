"""Shared steps of the outbox and relay tests: services that commit, a Redis of our own.

Everything talks to real servers; waits poll a condition against a deadline and fail
with what they last saw.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db.outbox import enqueue
from govflow.db.workflows import apply_workflow
from govflow.producers.relay import Relay
from govflow.schemas.codec import decode_workflow
from govflow.schemas.events import Change, Event, new_event
from govflow.schemas.settings import Settings
from tests.pipeline_helpers import wait_for, worker_env

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "deploy" / "examples"
ALL_ROLES = frozenset({"triggers", "actions", "relay"})
# The console script installed next to this interpreter: what an operator runs.
GOVFLOW = Path(sys.executable).parent / "govflow"

# One task per new policy, one per status change: an execution per event, easy to count.
WORKFLOWS = (
    """
name: outbox-new-policy
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}", assignee: "{data.owner}"}
""",
    """
name: outbox-status-change
entity: policy
trigger: status_change
actions:
  - create_task: {title: "Check {entity_id} is {data.status}"}
""",
)


async def apply_workflows(pool: AsyncConnectionPool[Any]) -> None:
    """Register the two test workflows."""
    async with pool.connection() as conn:
        for text in WORKFLOWS:
            await apply_workflow(conn, decode_workflow(text, "test"))


async def create_policies(pool: AsyncConnectionPool[Any], *ids: str) -> None:
    """The table of a policy service that shares govflow's database, with some rows."""
    async with pool.connection() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS policies (id text PRIMARY KEY, status text NOT NULL)"
        )
        for policy_id in ids:
            await conn.execute(
                "INSERT INTO policies VALUES (%s, 'draft') ON CONFLICT DO NOTHING", (policy_id,)
            )


def policy_created(entity_id: str, n: int = 0) -> Event:
    """A new-policy event."""
    return new_event(
        "policy.created", entity_id, data={"title": f"Policy {n}", "owner": f"user-{n}"}
    )


async def commit_policies(pool: AsyncConnectionPool[Any], events: list[Event]) -> list[int]:
    """A policy service's transaction: insert each policy and enqueue its event, then commit."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS policies (id text PRIMARY KEY, status text NOT NULL)"
        )
        ids = []
        for event in events:
            await conn.execute(
                "INSERT INTO policies VALUES (%s, 'draft') ON CONFLICT DO NOTHING",
                (event.entity_id,),
            )
            ids.append(await enqueue(conn, event))
        return ids


def status_changed(entity_id: str, before: str, after: str) -> Event:
    """A status-change event."""
    return new_event(
        "policy.status_changed",
        entity_id,
        data={"status": after},
        changes={"status": Change(from_=before, to=after)},
    )


async def now(value: T) -> T:
    """``value``, as a probe for ``wait_for`` of something read without awaiting."""
    return value


async def payloads(redis: Redis, stream: str) -> list[bytes]:
    """The ``event`` field of every entry of ``stream``, in stream order."""
    # redis-py types the reply loosely (None, str): a bytes client gets this.
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(stream)  # type: ignore[assignment]
    return [fields[b"event"] for _, fields in entries]


async def stream_ids(redis: Redis, stream: str) -> list[str]:
    """The event ids on a stream, in stream order (entries that are not events included)."""
    return [msgspec.json.decode(p)["id"] for p in await payloads(redis, stream)]


async def fetch(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one query; return its rows."""
    async with pool.connection() as conn:
        cur = await conn.execute(query.encode(), params)
        return await cur.fetchall() if cur.description else []


async def scalar(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> Any:
    """Run one query; return the first column of its first row."""
    return (await fetch(pool, query, *params))[0][0]


async def outbox_state(pool: AsyncConnectionPool[Any]) -> tuple[int, int]:
    """(rows published, rows waiting)."""
    rows = await fetch(
        pool,
        "SELECT count(published_at), count(*) - count(published_at) FROM outbox",
    )
    return int(rows[0][0]), int(rows[0][1])


async def completed_events(pool: AsyncConnectionPool[Any]) -> int:
    """Executions completed so far."""
    return int(
        await scalar(pool, "SELECT count(*) FROM workflow_executions WHERE status = 'completed'")
    )


async def run_once_problems(pool: AsyncConnectionPool[Any], event_ids: list[str]) -> list[str]:
    """What contradicts "each event ran its workflow once, with one effect"; empty when fine."""
    rows = await fetch(
        pool,
        "SELECT e.event_id, count(DISTINCT e.id), bool_and(e.status = 'completed'),"
        " count(t.*) FROM workflow_executions e LEFT JOIN tasks t ON t.execution_id = e.id"
        " GROUP BY e.event_id",
    )
    seen = {event_id: (n, done, tasks) for event_id, n, done, tasks in rows}
    problems = [f"{e}: never executed" for e in event_ids if e not in seen]
    problems += [f"{e}: not ours" for e in seen if e not in set(event_ids)]
    problems += [
        f"{e}: {n} executions, completed={done}, {tasks} tasks"
        for e, (n, done, tasks) in seen.items()
        if (n, done, tasks) != (1, True, 1)
    ]
    return problems


@contextlib.asynccontextmanager
async def running_relay(relay: Relay) -> AsyncIterator[Relay]:
    """Run a ``Relay`` in this test's event loop; ``stop()`` it on the way out."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        try:
            yield relay
        finally:
            relay.stop()


def start_relay_process(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """Start ``govflow run --role relay`` as a subprocess, the way an operator does."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(GOVFLOW), "run", "--role", "relay"],
            cwd=ROOT,
            env=worker_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def exit_status(proc: subprocess.Popen[bytes], within: float = 15.0) -> int:
    """Wait for a subprocess to exit without blocking the event loop; its exit status."""
    return (
        await wait_for(
            lambda: now(proc.poll()), lambda rc: rc is not None, within=within, what="exit"
        )
        or 0
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Make sure a subprocess this test started is gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
