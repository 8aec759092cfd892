"""Servers that go away: Redis killed and restarted, Postgres stopped and restarted, and
connections cut in the middle of a command by a proxy.

README.md, "Guarantees": a Redis restart with AOF on, or Postgres going away for a while,
delays work and loses none of it. The workers and the producer are never restarted here: they must
reconnect by themselves.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from govflow.core import deployment
from govflow.db import executions
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    EVENTS,
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    in_process_worker,
    jitter,
    make_events,
    record,
    settle,
    wait_started,
)
from tests.faults.proxy import Direction, proxy_to
from tests.faults.servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

REDIS_KILLS = 3
CUTS = 30


async def pending(redis_url: str) -> int:
    """Entries delivered and not acknowledged, over both groups."""
    redis = Redis.from_url(redis_url, socket_timeout=5)
    keys = Keys(PREFIX)
    try:
        total = 0
        for stream, group in ((keys.events(), "triggers"), (keys.commands(), "actions")):
            total += int((await redis.xpending(stream, group))["pending"])
        return total
    finally:
        await redis.aclose()


async def test_redis_killed_and_restarted_loses_nothing(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    await apply_workflows(fault_database_url)
    events, wants = make_events(EVENTS, "redis")
    workers = Workers(fault_redis.url, fault_database_url, logs, log_level="info")
    producer = Producer(fault_redis.url, Keys(PREFIX))
    try:
        for slot in range(2):
            workers.start(slot)
        await wait_started(workers)
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer.run, events)
            for _ in range(REDIS_KILLS):
                await anyio.sleep(jitter(1.5, 3.0))
                down = jitter(0.2, 1.5)
                await anyio.to_thread.run_sync(functools.partial(fault_redis.restart, down))
        report = await settle(
            fault_redis.url, fault_database_url, expected_of(producer.accepted, wants), within=150
        )
        assert workers.crashed() == [], workers.tail()
    finally:
        workers.stop_all()
    record(
        "Redis SIGKILL + restart",
        len(events),
        f"{fault_redis.kills} SIGKILLs of Redis (AOF always), down 0.2-1.5 s;"
        f" publish calls that gave up and were retried: {producer.publish_errors}",
        report,
        started,
    )
    assert len(producer.accepted) == len(events)
    assert fault_redis.kills == REDIS_KILLS
    assert report.ok, f"{report.summary()}\n{workers.tail()}"


async def test_postgres_stopped_and_restarted_loses_nothing(
    fault_redis: RedisServer,
    fault_postgres: PostgresServer,
    fault_database_url: str,
    logs: Path,
) -> None:
    started = time.monotonic()
    await apply_workflows(fault_database_url)
    events, wants = make_events(EVENTS, "pg")
    workers = Workers(fault_redis.url, fault_database_url, logs, log_level="info")
    producer = Producer(fault_redis.url, Keys(PREFIX), pause=0.25)  # still publishing when down
    held: list[int] = []
    try:
        for slot in range(2):
            workers.start(slot)
        await wait_started(workers)
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer.run, events)
            for mode in ("fast", "immediate"):
                await anyio.sleep(jitter(1.0, 2.5))
                await anyio.to_thread.run_sync(fault_postgres.stop, mode)
                # Down for longer than the claim idle time: held entries keep their lease.
                await anyio.sleep(3.0)
                held.append(await pending(fault_redis.url))
                await anyio.to_thread.run_sync(fault_postgres.start)
        report = await settle(
            fault_redis.url, fault_database_url, expected_of(producer.accepted, wants), within=150
        )
        assert workers.crashed() == [], workers.tail()
    finally:
        workers.stop_all()
    record(
        "Postgres stop + restart",
        len(events),
        "Postgres down 3 s twice (pg_ctl stop -m fast, then -m immediate)",
        report,
        started,
    )
    # While Postgres was away the workers held what they had read: pending, not acked.
    assert all(n > 0 for n in held), held
    assert report.ok, f"{report.summary()}\n{workers.tail()}"


async def test_connections_cut_mid_command_lose_nothing(
    fault_redis: RedisServer,
    fault_postgres: PostgresServer,
    fault_database_url: str,
    logs: Path,
) -> None:
    started = time.monotonic()
    await apply_workflows(fault_database_url)
    events, wants = make_events(EVENTS, "cut")
    with proxy_to(fault_redis.port) as redis_proxy, proxy_to(fault_postgres.port) as pg_proxy:
        redis_url = f"redis://127.0.0.1:{redis_proxy.port}/0"
        database_url = fault_database_url.replace(f":{fault_postgres.port}/", f":{pg_proxy.port}/")
        workers = Workers(redis_url, database_url, logs, log_level="info")
        producer = Producer(redis_url, Keys(PREFIX))
        fired = 0
        try:
            for slot in range(2):
                workers.start(slot)
            await wait_started(workers)
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.run, events)
                for _ in range(CUTS):
                    await anyio.sleep(jitter(0.1, 0.5))
                    proxy = random.choice((redis_proxy, pg_proxy))
                    direction: Direction = random.choice(("request", "reply"))
                    hit = await anyio.to_thread.run_sync(proxy.cut_mid_command, direction, 2.0)
                    fired += hit
            report = await settle(
                fault_redis.url,
                fault_database_url,
                expected_of(producer.accepted, wants),
                within=150,
            )
            assert workers.crashed() == [], workers.tail()
        finally:
            workers.stop_all()
    record(
        "connections cut mid-command",
        len(events),
        f"{fired} cuts inside a command or reply (Redis and Postgres),"
        f" {redis_proxy.cuts + pg_proxy.cuts} connections aborted",
        report,
        started,
    )
    assert fired >= CUTS // 2, "the proxy found too little traffic to cut"
    assert report.ok, f"{report.summary()}\n{workers.tail()}"


async def test_redis_lost_between_an_execution_and_its_command_loses_nothing(
    fault_redis: RedisServer, fault_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis dies after the trigger matcher wrote executions, before it emitted commands.

    The loop holds the batch and hands it back once Redis is back: a retry that counts no
    attempt, which must still emit the commands of the executions it left queued.
    """
    await apply_workflows(fault_database_url)
    events, wants = make_events(100, "between")
    real = executions.insert_queued
    lost_redis = anyio.Event()

    async def insert_then_lose_redis(*args: Any) -> Any:
        queued = await real(*args)
        if not lost_redis.is_set():
            await anyio.to_thread.run_sync(fault_redis.kill)  # commits, then finds Redis gone
            lost_redis.set()
        return queued

    monkeypatch.setattr(executions, "insert_queued", insert_then_lose_redis)
    async with in_process_worker(fault_redis.url, fault_database_url):
        await Producer(fault_redis.url, Keys(PREFIX), chunk=100, pause=0).run(events)
        await lost_redis.wait()
        await anyio.sleep(1.0)
        await anyio.to_thread.run_sync(fault_redis.start)
        report = await settle(
            fault_redis.url,
            fault_database_url,
            expected_of([e.id for e in events], wants),
            within=60,
        )
    assert report.ok, report.summary()


async def test_redis_lost_during_the_workers_start_up_delays_it_and_loses_nothing(
    fault_redis: RedisServer, fault_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis dies after the worker connected, before its start-up checks ran.

    A worker restarted beside a Redis restart meets this window; it must wait for Redis as
    it does before connecting, not exit.
    """
    await apply_workflows(fault_database_url)
    events, wants = make_events(50, "start-up")
    real = deployment.check_worker
    checks = 0
    # Redis back a second after it died, while the worker waits for it.
    comeback = threading.Timer(1.0, fault_redis.start)

    async def lose_redis_then_check(*args: Any) -> None:
        nonlocal checks
        checks += 1
        if checks == 1:
            await anyio.to_thread.run_sync(fault_redis.kill)
            comeback.start()
        await real(*args)

    monkeypatch.setattr(deployment, "check_worker", lose_redis_then_check)
    try:
        async with in_process_worker(fault_redis.url, fault_database_url):
            assert checks >= 2, "the check did not run again once Redis was back"
            await Producer(fault_redis.url, Keys(PREFIX), chunk=50, pause=0).run(events)
            report = await settle(
                fault_redis.url,
                fault_database_url,
                expected_of([e.id for e in events], wants),
                within=60,
            )
    finally:
        await anyio.to_thread.run_sync(comeback.join)
    assert report.ok, report.summary()
