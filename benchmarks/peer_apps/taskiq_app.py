"""taskiq with taskiq-redis's stream broker: each job as two async tasks.

The consumer group starts at ``0``, not taskiq's default ``$``, so a backlog published
before the workers start is read (NOTES.md, "Running the peers side by side"); the
producer also creates the group before it publishes.

Worker: ``taskiq worker benchmarks.peer_apps.taskiq_app:broker``; for the notify job,
with ``--max-async-tasks`` (``peers.PEERS``).
Producer: ``python -m benchmarks.peer_apps.taskiq_app RUN N RATE [drain|notify]``.
"""

# mypy: disable-error-code="import-not-found,untyped-decorator"
# (the peers' packages live in benchmarks/.peers/py, not in govflow's environment)

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psycopg
from taskiq import TaskiqEvents, TaskiqState
from taskiq_redis import RedisStreamBroker

from benchmarks.peer_apps import common

SLOTS = common.DB_CONNECTIONS  # connections per worker process; tasks beyond wait for one

broker = RedisStreamBroker(
    url=common.REDIS_URL,
    queue_name=f"{common.QUEUE}:taskiq",
    consumer_group_name="bench",
    consumer_name=str(uuid.uuid4()),
    consumer_id="0",
)
_pool: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
_http: list[aiohttp.ClientSession] = []  # the worker's one session, made at start-up


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _connect(state: TaskiqState) -> None:
    for _ in range(SLOTS):
        _pool.put_nowait(
            await psycopg.AsyncConnection.connect(common.DATABASE_URL, autocommit=True)
        )
    # As many keep-alive connections as tasks in flight (aiohttp's default limit is 100).
    _http.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=common.IO_SLOTS)))


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def _disconnect(state: TaskiqState) -> None:
    for session in _http:
        await session.close()


@contextlib.asynccontextmanager
async def _borrowed() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """One of the worker's connections, for the length of the block."""
    conn = await _pool.get()
    try:
        yield conn
    finally:
        _pool.put_nowait(conn)


async def _record_execution(event: dict[str, Any], workflow: str) -> dict[str, Any]:
    """Task 1's SQL for an event of ``workflow``; return task 2's argument."""
    row = common.execution_row(event, workflow)
    async with _borrowed() as conn:
        await conn.execute(common.INSERT_EXECUTION, row)
    return {"execution_id": row[0], **event}


@broker.task(task_name="bench.record")
async def record(event: dict[str, Any]) -> None:
    await effects.kiq(await _record_execution(event, common.DRAIN))


@broker.task(task_name="bench.effects")
async def effects(job: dict[str, Any]) -> None:
    async with _borrowed() as conn, conn.transaction():
        await conn.execute(
            common.INSERT_TASK,
            (job["execution_id"], job["entity_id"], f"Review {job['title']}", job["owner"]),
        )
        await conn.execute(common.INSERT_ASSIGNMENT, (job["execution_id"], job["entity_id"]))
        await conn.execute(common.FINISH, (job["execution_id"],))


@broker.task(task_name="bench.notify_record")
async def notify_record(event: dict[str, Any]) -> None:
    await notify.kiq(await _record_execution(event, common.NOTIFY))


@broker.task(task_name="bench.notify")
async def notify(job: dict[str, Any]) -> None:
    body, headers = common.webhook(job)
    async with _http[0].post(common.WEBHOOK_URL, data=body, headers=headers) as answer:
        await answer.read()
        answer.raise_for_status()
    async with _borrowed() as conn, conn.transaction():
        await conn.execute(
            common.INSERT_NOTIFICATION,
            (job["execution_id"], common.WEBHOOK_URL, common.message(job),
             common.idempotency_key(job), answer.status),
        )  # fmt: skip
        await conn.execute(common.FINISH, (job["execution_id"],))


async def produce(run: str, n: int, rate: float, job: str) -> float:
    await broker.startup()  # creates the consumer group at 0 before anything is published
    first = notify_record if job == "notify" else record
    started = time.perf_counter()
    sent = 0
    while sent < n:
        if rate <= 0:
            due = min(n, sent + 100)
        else:
            due = min(n, int((time.perf_counter() - started) * rate) + 1)
            if due <= sent:
                await asyncio.sleep(max(0.0, sent / rate - (time.perf_counter() - started)))
                continue
        await asyncio.gather(*(first.kiq(common.event(run, i)) for i in range(sent, due)))
        sent = due
    seconds = time.perf_counter() - started
    await broker.shutdown()
    return seconds


if __name__ == "__main__":
    run, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    job = sys.argv[4] if len(sys.argv) > 4 else "drain"
    common.report(n, asyncio.run(produce(run, n, rate, job)))
