"""Worker processes that die: SIGKILL at random instants, and SIGTERM in the middle of a burst.

README.md, "Guarantees": no event that Redis accepted is lost, a worker killed at any
instant delays work and loses none of it; SIGTERM finishes the work in hand and exits 0.
The SIGKILL scenario runs again on Redis 6.2 (the embedded server), where entries deleted
while pending answer nil to the claim sweep that takes the dead worker's entries over.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from govflow.schemas.keys import Keys
from tests.faults.harness import (
    EVENTS,
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    kill_at_work,
    make_events,
    record,
    run_check,
    settle,
    wait_started,
)
from tests.faults.servers import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

KILLS = 12
WORKERS = 3
EVENTS_62 = 600
KILLS_62 = 8
DELETED_PER_KILL = 2
RECONCILE_AFTER = "3"


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
    try:
        for slot in range(WORKERS):
            workers.start(slot)
        await wait_started(workers)
        in_work = await kill_at_work(fault_redis.url, workers, producer, events, KILLS)
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


async def test_workers_killed_on_redis_6_2_with_commands_deleted_in_hand_lose_nothing(
    fault_redis_62: RedisServer, fault_database_url: str, logs: Path
) -> None:
    """Before each kill that finds its victim at work, two of the commands it holds are
    deleted (an operator's XDEL; a producer's MAXLEN does the same to events). 6.2's
    XAUTOCLAIM answers nil for them; the sweep must acknowledge them and go on claiming the
    live entries beside them, and the reconciler puts their executions back."""
    started = time.monotonic()
    redis = Redis.from_url(fault_redis_62.url, socket_timeout=10)
    try:
        assert (await redis.info("server"))["redis_version"].startswith("6.2.")
    finally:
        await redis.aclose()
    await apply_workflows(fault_database_url)
    events, wants = make_events(EVENTS_62, "kill62")
    workers = Workers(
        fault_redis_62.url, fault_database_url, logs, log_level="info",
        GOVFLOW_RECONCILE_AFTER=RECONCILE_AFTER,
    )  # fmt: skip
    producer = Producer(fault_redis_62.url, Keys(PREFIX), chunk=25, pause=0.15)
    deleted: list[str] = []

    async def delete_commands(pid: int) -> None:
        deleted.extend(await delete_in_hand(fault_redis_62.url, pid, DELETED_PER_KILL))

    try:
        for slot in range(WORKERS):
            workers.start(slot)
        await wait_started(workers)
        in_work = await kill_at_work(
            fault_redis_62.url, workers, producer, events, KILLS_62, before_kill=delete_commands
        )
        report = await settle(
            fault_redis_62.url,
            fault_database_url,
            expected_of(producer.accepted, wants),
            within=120,
        )
        assert workers.crashed() == [], workers.tail()
    finally:
        workers.stop_all()
    record(
        "worker SIGKILL on Redis 6.2",
        len(events),
        f"{workers.killed} SIGKILLs of 3 workers, {in_work} of them with entries in hand;"
        f" {len(deleted)} of their commands deleted (XDEL) while pending;"
        f" GOVFLOW_RECONCILE_AFTER={RECONCILE_AFTER}",
        report,
        started,
    )
    assert len(producer.accepted) == len(events)
    assert in_work >= KILLS_62 // 2, f"only {in_work} kills caught a worker at work"
    assert deleted, "no victim held a command to delete: nothing was tested"
    assert report.ok, f"{report.summary()}\n{workers.tail()}"


async def delete_in_hand(redis_url: str, pid: int, count: int) -> list[str]:
    """XDEL up to ``count`` of the commands worker ``pid`` holds (waiting up to 2 s for some)."""
    redis = Redis.from_url(redis_url, socket_timeout=5)
    stream = Keys(PREFIX).commands()
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            try:
                summary = await redis.xpending(stream, "actions")
            except redis_errors.ResponseError:
                summary = {"consumers": []}  # no group yet
            for consumer in summary["consumers"]:
                name = consumer["name"].decode()
                if f"-{pid}-" not in name or not int(consumer["pending"]):
                    continue
                held: Any = await redis.xpending_range(
                    stream, "actions", "-", "+", count, consumername=name
                )
                ids = [h["message_id"].decode() for h in held]
                if ids:
                    await redis.xdel(stream, *ids)
                    return ids
            await anyio.sleep(0.01)
        return []
    finally:
        await redis.aclose()


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
