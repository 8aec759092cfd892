"""A stale worker: frozen mid-webhook while another takes its work over and finishes it.

Worker A sends the first webhook of its batch; the receiver holds that request. A is
frozen (SIGSTOP, as a long GC pause or a suspended VM would freeze it); worker B claims
A's entries once they are idle for ``GOVFLOW_CLAIM_IDLE`` (with partitions, once A's
leases lapse) and completes every execution. The receiver then answers A's held request
``410 Gone`` and A is woken: it would dead-letter what B completed, but B's start of each
execution bumped its fencing token, so A's whole transaction is refused. Every execution
stays ``completed`` with its steps as B left them, no dead letter exists in Postgres or on
a dead-letter stream, and A says ``execution.fenced`` in its log.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg import AsyncConnection
from redis.asyncio import Redis

from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys
from tests.faults.harness import PREFIX, Producer, Workers, apply_workflows, record
from tests.faults.invariants import Expected, Report, check
from tests.faults.receiver import receiving
from tests.faults.servers import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.timeout(120)]

EVENTS = 5
CLAIM_IDLE = "1"
LEASE_TTL = "1.5"

WORKFLOW = """
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - notify: {webhook: "URL/{data.hook}", message: "{data.title} needs review"}
"""


class Gate:
    """Holds the first request to ``/held`` until opened, then answers it 410 Gone."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.held: str | None = None  # the Idempotency-Key of the request held
        self._lock = threading.Lock()

    def stall(self, path: str, key: str, n: int) -> float:
        with self._lock:
            if path == "/held" and self.held is None:
                self.held = key
        if (key, n) == (self.held, 1):
            self.opened.wait(60)
        return 0.0

    def answer(self, path: str, key: str, n: int) -> int:
        return 410 if (key, n) == (self.held, 1) else 200

    async def holding(self) -> bool:
        return self.held is not None


def policies(n: int, hook: str) -> list[Event]:
    return [
        new_event("policy.created", f"POL-{hook}-{i}", data={"title": f"Policy {i}", "hook": hook})
        for i in range(n)
    ]


@pytest.mark.parametrize("partitions", [1, 2])
async def test_a_stale_worker_cannot_undo_what_the_owner_finished(
    fault_redis: RedisServer, fault_database_url: str, logs: Path, partitions: int
) -> None:
    started = time.monotonic()
    keys = Keys(PREFIX, partitions)
    # A finishes some work first; then one execution, alone in flight, has its webhook held:
    # A is frozen with no transaction holding rows that B needs.
    plain, held = policies(EVENTS - 1, "plain"), policies(1, "held")
    gate = Gate()
    with receiving(gate.stall, gate.answer) as hooks:
        await apply_workflows(fault_database_url, [WORKFLOW.replace("URL", hooks.url(""))])
        stale = workers(fault_redis, fault_database_url, logs, partitions, concurrency=1)
        owner = workers(fault_redis, fault_database_url, logs, partitions, concurrency=2)
        producer = Producer(fault_redis.url, keys, chunk=EVENTS, pause=0.0)
        try:
            frozen = stale.start(0)
            await producer.run(plain)
            await wait_until(completed(fault_database_url, EVENTS - 1), "A's first work", 60, stale)
            await producer.run(held)
            await wait_until(gate.holding, "A's held webhook", 60, stale)
            frozen.send_signal(signal.SIGSTOP)
            try:
                owner.start(1)
                await wait_until(completed(fault_database_url, EVENTS), "B to finish", 60, owner)
                finished = await steps(fault_database_url)
                gate.opened.set()  # A's held request is answered 410 Gone
            finally:
                frozen.send_signal(signal.SIGCONT)
            await wait_until(woke(stale, fault_database_url), "A to end its batch", 30, stale)
            # Nothing A did after waking changed what B had finished.
            assert await steps(fault_database_url) == finished, stale.tail()
            assert await dead_letter_rows(fault_database_url) == 0, stale.tail()
            report = await run_check(
                fault_redis.url, fault_database_url, keys, [*plain, *held], hooks.deliveries()
            )
            assert stale.crashed() == [], stale.tail()
            assert owner.crashed() == [], owner.tail()
        finally:
            gate.opened.set()
            stale.stop_all()
            owner.stop_all()
    assert report.ok, f"{report.summary()}\n{stale.tail()}"
    assert fenced(stale), stale.tail()
    assert hooks.count("/held") == 2  # A's, answered 410, and B's
    record(
        f"stale worker, {partitions} partition{'s' if partitions > 1 else ''}",
        EVENTS,
        f"worker SIGSTOPped mid-webhook; another claimed after {CLAIM_IDLE} s"
        f"{f' (lease {LEASE_TTL} s)' if partitions > 1 else ''} and completed;"
        " the stale one woke to a 410 and was refused",
        report,
        started,
    )


def completed(database_url: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def done() -> bool:
        return await count(database_url, "status = 'completed'") == n

    return done


def woke(workers: Workers, database_url: str) -> Callable[[], Awaitable[bool]]:
    """Whether the woken worker ended its batch: fenced, or (without a fence) wrote."""

    async def ended() -> bool:
        if fenced(workers):
            return True
        changed = await count(database_url, "status <> 'completed'")
        return changed > 0 or await dead_letter_rows(database_url) > 0

    return ended


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, within: float, workers: Workers
) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert workers.crashed() == [], workers.tail()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}\n{workers.tail()}")
        await anyio.sleep(0.1)


def workers(
    redis: RedisServer, database_url: str, logs: Path, partitions: int, *, concurrency: int
) -> Workers:
    """Workers that claim after ``CLAIM_IDLE`` and wait long enough for a held webhook."""
    return Workers(
        redis.url,
        database_url,
        logs,
        concurrency=concurrency,
        GOVFLOW_CLAIM_IDLE=CLAIM_IDLE,
        GOVFLOW_PARTITIONS=str(partitions),
        GOVFLOW_LEASE_TTL=LEASE_TTL,
        GOVFLOW_WEBHOOK_TIMEOUT="60",  # A's held request must end in the 410, not a timeout
    )


def fenced(workers: Workers) -> bool:
    """Whether the worker said that its writes were refused."""
    return any(b'"execution.fenced"' in log.read_bytes() for log in workers.log_of.values())


async def count(database_url: str, where: str) -> int:
    async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM workflow_executions WHERE {where}".encode())
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def steps(database_url: str) -> list[tuple[Any, ...]]:
    """Every execution with its status, attempts and steps, as they stand."""
    async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT e.id, e.status, e.attempts, e.last_error, s.step, s.status, s.attempts,"
            " s.error, s.updated_at FROM workflow_executions e"
            " LEFT JOIN execution_steps s ON s.execution_id = e.id ORDER BY e.id, s.step"
        )
        return await cur.fetchall()


async def dead_letter_rows(database_url: str) -> int:
    async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM dead_letters")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def run_check(
    redis_url: str,
    database_url: str,
    keys: Keys,
    events: list[Event],
    deliveries: Mapping[str, Sequence[bytes]],
) -> Report:
    """The invariant checker on this scenario's partitions: nothing lost, doubled or left."""
    redis = Redis.from_url(redis_url, socket_timeout=10)
    expected = Expected(workflows={e.id: frozenset({"review"}) for e in events})
    try:
        async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
            return await check(redis, conn, keys, expected, deliveries)
    finally:
        await redis.aclose()
