"""A worker cut off from Postgres alone gives its partitions up; a healthy one takes them.

Two workers, two partitions (leases of 2 s). The proxy between one worker and Postgres
refuses every connection while Redis stays in reach of both: the cut worker must give its
partitions up, the healthy one must take them over and finish every event while the link
is still down; once the link is back, the cut worker takes its share again and nothing has
run twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from govflow.core.unavailable import UNAVAILABLE
from govflow.db.pool import RECONNECT_MAX_S, open_pool
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    make_events,
    record,
    settle,
    wait_started,
)
from tests.faults.proxy import proxy_to
from tests.faults.servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(240)]

LEASE_TTL = 2.0
PARTITIONS = 2
EVENTS = 300  # each wave
GROUPS = ("triggers", "actions")


async def lease_holders(redis_url: str, keys: Keys) -> list[str]:
    """The worker id holding each partition lease of both groups ('' when free)."""
    redis = Redis.from_url(redis_url, socket_timeout=5)
    try:
        values: list[Any] = [
            await redis.get(keys.lease(group, p)) for group in GROUPS for p in keys.all_partitions()
        ]
        return [v.decode() if v else "" for v in values]
    finally:
        await redis.aclose()


async def wait_holding(redis_url: str, keys: Keys, pid: int, *, count: int, within: float) -> float:
    """Wait until worker ``pid`` holds exactly ``count`` leases; return the seconds it took."""
    started = time.monotonic()
    while True:
        held = [h for h in await lease_holders(redis_url, keys) if f"-{pid}-" in h]
        if len(held) == count:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"worker {pid} holds {len(held)} leases"
        await anyio.sleep(0.1)


async def test_a_worker_cut_off_from_postgres_gives_its_partitions_to_a_healthy_one(
    fault_redis: RedisServer, fault_postgres: PostgresServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    keys = Keys(PREFIX, PARTITIONS)
    await apply_workflows(fault_database_url)
    first, wants = make_events(EVENTS, "cut-off")
    second, more = make_events(EVENTS, "back")
    with proxy_to(fault_postgres.port) as link:
        cut_url = fault_database_url.replace(f":{fault_postgres.port}/", f":{link.port}/")
        # Slots 0 (cut) and 1 (healthy): the two workers' logs never share a name.
        cut, healthy = (
            Workers(
                fault_redis.url, url, logs, log_level="info",
                GOVFLOW_PARTITIONS=str(PARTITIONS), GOVFLOW_LEASE_TTL=str(LEASE_TTL),
            )
            for url in (cut_url, fault_database_url)
        )  # fmt: skip
        producer = Producer(fault_redis.url, keys)
        try:
            cut_pid, healthy_pid = cut.start(0).pid, healthy.start(1).pid
            await wait_started(cut)
            await wait_started(healthy)
            # A fair share each: one partition of each group.
            await wait_holding(fault_redis.url, keys, cut_pid, count=2, within=30)

            link.link_down()
            await producer.run(first)
            moved_s = await wait_holding(
                fault_redis.url, keys, healthy_pid, count=2 * PARTITIONS, within=10 * LEASE_TTL
            )
            report = await settle(
                fault_redis.url,
                fault_database_url,
                expected_of(producer.accepted, wants),
                within=60,
                keys=keys,
            )
            assert report.ok, report.summary() + "\n" + cut.tail() + healthy.tail()

            link.link_up()
            resumed_s = await wait_holding(
                fault_redis.url, keys, cut_pid, count=2, within=10 * LEASE_TTL
            )
            await producer.run(second)
            report = await settle(
                fault_redis.url,
                fault_database_url,
                expected_of(producer.accepted, {**wants, **more}),
                within=60,
                keys=keys,
            )
            assert report.ok, report.summary() + "\n" + cut.tail() + healthy.tail()
            assert cut.crashed() == [], cut.tail()
            assert healthy.crashed() == [], healthy.tail()
        finally:
            cut.stop_all()
            healthy.stop_all()
    print(f"\npartitions moved {moved_s:.1f} s after the cut; taken back {resumed_s:.1f} s after")
    record(
        "worker cut off from Postgres, with partitions",
        len(first) + len(second),
        f"one of 2 workers (2 partitions, {LEASE_TTL:g} s leases) cut off from Postgres only;"
        f" its partitions moved in {moved_s:.1f} s, all {len(first)} events finished while"
        f" it was cut; link back: it held its share again after {resumed_s:.1f} s, then"
        f" {len(second)} more",
        report,
        started,
    )


OUTAGE_S = 9.0  # psycopg_pool's own backoff would wait 8 s before its next attempt by then


async def test_the_pool_reconnects_within_its_cap_after_a_long_outage(
    fault_postgres: PostgresServer, fault_database_url: str
) -> None:
    with proxy_to(fault_postgres.port) as link:
        url = fault_database_url.replace(f":{fault_postgres.port}/", f":{link.port}/")
        pool = await open_pool(url, max_size=2)
        try:
            link.link_down()
            deadline = time.monotonic() + OUTAGE_S
            while time.monotonic() < deadline:
                with pytest.raises(UNAVAILABLE):
                    async with pool.connection(timeout=1.0) as conn:
                        await conn.execute("SELECT 1")
            link.link_up()
            # Uncapped, the next attempt would come about 6 s from now (1 + 2 + 4 + 8 s).
            async with pool.connection(timeout=RECONNECT_MAX_S + 1.5) as conn:
                await conn.execute("SELECT 1")
        finally:
            await pool.close()
