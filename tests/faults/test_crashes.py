"""Worker processes that die: SIGKILL at random instants, and SIGTERM in the middle of a burst.

README.md, "Guarantees": no event that Redis accepted is lost, a worker killed at any
instant delays work and loses none of it; SIGTERM finishes the work in hand and exits 0.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import anyio
import psycopg
import pytest

from govflow.schemas.keys import Keys
from tests.faults.harness import (
    EVENTS,
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    jitter,
    make_events,
    record,
    run_check,
    settle,
    some_ready,
    wait_in_hand,
    wait_started,
)
from tests.faults.servers import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

KILLS = 12
WORKERS = 3


async def test_workers_killed_with_sigkill_at_random_instants_lose_and_double_nothing(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    await apply_workflows(fault_database_url)
    events, wants = make_events(EVENTS, "kill")
    workers = Workers(fault_redis.url, fault_database_url, logs, log_level="info")
    # Events keep arriving (for about 9 s, however fast the workers are), worked through
    # by three workers that keep being killed: each kill lands at a random instant at
    # which its victim holds entries (delivered, unacknowledged).
    producer = Producer(fault_redis.url, Keys(PREFIX), chunk=25, pause=0.15)
    in_work = 0
    try:
        for slot in range(WORKERS):
            workers.start(slot)
        await wait_started(workers)
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer.run, events)
            for _ in range(KILLS):
                slot = random.choice(await some_ready(workers))  # not one still starting up
                busy = await wait_in_hand(fault_redis.url, workers.procs[slot].pid, 5.0)
                in_work += busy
                workers.kill(slot)
                workers.start(slot)
                if not busy and len(producer.accepted) == len(events):
                    break  # the events are all in, and worked through
                await anyio.sleep(jitter(0.1, 0.6))
        report = await settle(
            fault_redis.url, fault_database_url, expected_of(producer.accepted, wants), within=150
        )
        assert workers.crashed() == [], workers.tail()
    finally:
        workers.stop_all()
    faults = f"{workers.killed} SIGKILLs of 3 workers, {in_work} of them with entries in hand"
    record("worker SIGKILL", len(events), faults, report, started)
    assert len(producer.accepted) == len(events)
    assert in_work >= KILLS // 2, f"only {in_work} kills caught a worker at work"
    assert report.ok, f"{report.summary()}\n{workers.tail()}"


async def test_sigterm_during_a_burst_exits_0_and_loses_nothing(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    await apply_workflows(fault_database_url)
    events, wants = make_events(EVENTS, "term")
    expected = expected_of([e.id for e in events], wants)
    workers = Workers(fault_redis.url, fault_database_url, logs, log_level="info")
    try:
        for slot in range(2):
            workers.start(slot)
        await wait_started(workers)
        # The whole burst at once, then SIGTERM to every worker while it is being worked.
        producer = Producer(fault_redis.url, Keys(PREFIX), chunk=250, pause=0.0)
        await producer.run(events)
        await _wait_for_progress(fault_database_url, workers, wanted=100)
        codes = workers.terminate(0, 1)
        at_stop = await run_check(fault_redis.url, fault_database_url, expected)
        workers.start(2)
        report = await settle(fault_redis.url, fault_database_url, expected, within=120)
    finally:
        workers.stop_all()
    record("SIGTERM mid-burst", len(events), "SIGTERM to both workers", report, started)
    assert codes == [0, 0], workers.tail()
    assert "Traceback" not in workers.tail(lines=10_000)
    # They stopped mid-burst, and whatever they had taken they finished and acknowledged.
    assert not at_stop.ok, "the burst was over before SIGTERM: nothing was tested"
    assert not any("pending" in p for p in at_stop.problems), at_stop.summary()
    assert report.ok, f"{report.summary()}\n{workers.tail()}"
    # A graceful stop hands no half-done work over: nothing ran twice.
    assert report.redelivered == 0


async def _wait_for_progress(database_url: str, workers: Workers, wanted: int) -> None:
    """Wait until ``wanted`` executions completed, so that SIGTERM lands mid-burst."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM workflow_executions WHERE status = 'completed'"
            )
            row = await cur.fetchone()
        if row and row[0] >= wanted:
            return
        assert workers.crashed() == [], workers.tail()
        await anyio.sleep(0.05)
    raise AssertionError(f"the workers made no progress within 60 s\n{workers.tail()}")
