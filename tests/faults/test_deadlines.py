"""Deadlines are durable: they fire once each, through worker SIGKILLs, a moment with no
worker at all, and a Redis SIGKILL.

README.md, "Workflows that wait for people": a deadline fires once, after restarts, with
every worker killed in between. Every approval and task here waits with a due time of 2,
3 or 5 s and nobody decides; each must expire exactly once (the record of updates in
``tests/faults/waits.py``), its ``on_expired`` branch run once, its execution end
``completed``, and nothing stay on any stream.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from govflow.schemas.events import Event
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    jitter,
    kill_one,
    record,
    settle,
    wait_started,
)
from tests.faults.servers import RedisServer
from tests.faults.waits import (
    DEADLINE_WORKFLOWS,
    LONGEST_DUE_S,
    database_now,
    deadline_events,
    due_between,
    logged,
    open_deadlines,
    outcome_problems,
    record_outcomes,
)

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

EVENTS = 300
WORKERS = 3
KILLS = 8
# Work the deadline service resumed but whose command Redis never got (a SIGKILL between
# the two, Redis down) is put back by the reconciler once this overdue.
RECONCILE_AFTER = "3"
EXPIRED = {"approvals": "expired", "tasks": "expired"}


def deadline_workers(redis_url: str, database_url: str, logs: Path) -> Workers:
    return Workers(redis_url, database_url, logs, log_level="info",
                   GOVFLOW_RECONCILE_AFTER=RECONCILE_AFTER)  # fmt: skip


async def publish_while_killing(
    workers: Workers, producer: Producer, redis_url: str, events: list[Event]
) -> int:
    """Publish over a few seconds while workers are SIGKILLed and started again; return how
    many kills caught their worker with entries in hand (an event, a command, a resume)."""
    in_work = kills = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer.run, events)
        while kills < KILLS or len(producer.accepted) < len(events):
            in_work += await kill_one(redis_url, workers, within=1.0)
            kills += 1
            await anyio.sleep(jitter(0.1, 0.6))
    return in_work


def put_back(logs: Path) -> str:
    """How many commands the reconciler emitted again, as the table says it."""
    reemitted = logged(logs, "reconcile.put_back", "reemitted")
    return f"{reemitted} resumes put back by the reconciler (GOVFLOW_RECONCILE_AFTER=3)"


async def some_open(database_url: str, wanted: int = 20, within: float = 60.0) -> int:
    """Wait until ``wanted`` deadlines are open and not yet due (at least one after
    ``within`` seconds); return how many are."""
    deadline = time.monotonic() + within
    while True:
        count, _ = await open_deadlines(database_url)
        if count >= wanted or (count and time.monotonic() > deadline):
            return count
        assert time.monotonic() < deadline + within, "no deadline was ever open"
        await anyio.sleep(0.05)


async def until_all_due(database_url: str) -> None:
    """Wait until every open deadline is past its due time."""
    _, last_in = await open_deadlines(database_url)
    await anyio.sleep(last_in + 0.5)


async def test_deadlines_fire_once_through_sigkills_and_a_time_with_no_worker(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    db = fault_database_url
    await apply_workflows(db, DEADLINE_WORKFLOWS)
    await record_outcomes(db)
    events, wants = deadline_events(EVENTS, "kill")
    workers = deadline_workers(fault_redis.url, db, logs)
    producer = Producer(fault_redis.url, Keys(PREFIX), chunk=20, pause=0.3)
    try:
        for slot in range(WORKERS):
            workers.start(slot)
        await wait_started(workers)
        in_work = await publish_while_killing(workers, producer, fault_redis.url, events)
        # Every worker dies, and deadlines pass with no one to fire them.
        await some_open(db)
        for slot in list(workers.procs):
            workers.kill(slot)
        in_blackout, _ = await open_deadlines(db)
        await until_all_due(db)
        for slot in range(2):
            workers.start(slot)
        report = await settle(
            fault_redis.url, db, expected_of(producer.accepted, wants), within=120
        )
        problems = await outcome_problems(db, EXPIRED)
        assert workers.crashed() == [], workers.tail()
    finally:
        workers.stop_all()
    faults = (
        f"{workers.killed} SIGKILLs of 3 workers ({in_work} with entries in hand) while"
        f" deadlines of 2-5 s fell due, then every"
        f" worker killed while {in_blackout} deadlines passed; {put_back(logs)}"
    )
    record("deadlines, worker SIGKILL", len(events), faults, report, started)
    assert in_blackout > 0, "no deadline passed while every worker was dead: nothing was tested"
    assert report.ok, f"{report.summary()}\n{workers.tail()}"
    assert problems == [], problems[:20]
    assert logged(logs, "deadlines.fired", "count") <= EVENTS


async def test_deadlines_fire_once_through_a_redis_sigkill(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    db = fault_database_url
    await apply_workflows(db, DEADLINE_WORKFLOWS)
    await record_outcomes(db)
    events, wants = deadline_events(EVENTS, "redis")
    workers = deadline_workers(fault_redis.url, db, logs)
    producer = Producer(fault_redis.url, Keys(PREFIX), chunk=20, pause=0.3)
    try:
        for slot in range(WORKERS):
            workers.start(slot)
        await wait_started(workers)
        in_work = await publish_while_killing(workers, producer, fault_redis.url, events)
        # Redis dies while deadlines fall due: the workers expire them in Postgres and
        # cannot emit the commands that resume their executions.
        await some_open(db)
        down_since = await database_now(db)
        fault_redis.kill()
        await anyio.sleep(LONGEST_DUE_S / 2)
        in_outage = await due_between(db, down_since)
        fault_redis.start()
        report = await settle(
            fault_redis.url, db, expected_of(producer.accepted, wants), within=120
        )
        problems = await outcome_problems(db, EXPIRED)
        assert workers.crashed() == [], workers.tail()
    finally:
        workers.stop_all()
    faults = (
        f"{workers.killed} SIGKILLs of 3 workers ({in_work} with entries in hand), then Redis"
        f" SIGKILLed and down"
        f" {LONGEST_DUE_S / 2:g} s (AOF) while {in_outage} deadlines fell due;"
        f" {put_back(logs)}"
    )
    record("deadlines, Redis SIGKILL", len(events), faults, report, started)
    assert in_outage > 0, "no deadline fell due while Redis was down: nothing was tested"
    assert report.ok, f"{report.summary()}\n{workers.tail()}"
    assert problems == [], problems[:20]
    assert logged(logs, "deadlines.fired", "count") <= EVENTS
