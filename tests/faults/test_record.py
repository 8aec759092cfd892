"""Postgres is the record: Redis that loses writes it had acknowledged loses no work.

A host crash with ``appendfsync everysec``, or a failover to a replica that lagged, takes
Redis back to an older state. Modelled here by restarting Redis from a snapshot taken
before the trigger matcher and the relay ran: the executions Postgres committed lost their
commands, and the outbox rows marked published lost their events. With every role running
afterwards, each of them must still finish, once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from govflow.db.outbox import enqueue
from govflow.schemas.events import Event
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    make_events,
    record,
    scalar,
    settle,
    wait_started,
    wait_until,
)
from tests.faults.servers import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

DIRECT = 300  # published to the stream, taken by the matcher, then lost by Redis
TAKEN = 100  # outbox rows published and taken by the matcher, then lost
UNTAKEN = 100  # outbox rows published while no matcher ran, then lost
RECONCILE_AFTER = "3"


async def commit_outbox(database_url: str, events: list[Event]) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for event in events:
            await enqueue(conn, event)


async def test_redis_back_from_an_older_snapshot_loses_nothing(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    await apply_workflows(fault_database_url)
    direct, wants = make_events(DIRECT, "direct")
    outboxed, outbox_wants = make_events(TAKEN + UNTAKEN, "outbox")
    wants.update(outbox_wants)

    def workers(roles: str) -> Workers:
        return Workers(
            fault_redis.url, fault_database_url, logs, roles=roles, log_level="info",
            GOVFLOW_RECONCILE_AFTER=RECONCILE_AFTER,
        )  # fmt: skip

    matcher, relay, everyone = workers("triggers"), workers("relay"), workers("all")
    redis = Redis.from_url(fault_redis.url, socket_timeout=10)
    producer = Producer(fault_redis.url, Keys(PREFIX), chunk=100, pause=0)
    keys = Keys(PREFIX)

    async def triggers_group() -> dict[str, Any] | None:
        try:
            groups: list[dict[str, Any]] = await redis.xinfo_groups(keys.events())
        except redis_errors.ResponseError:  # no stream yet
            return None
        return next((g for g in groups if g["name"] == b"triggers"), None)

    async def group_made() -> bool:
        return await triggers_group() is not None

    async def all_taken() -> bool:
        """Every event delivered to the matcher and acknowledged: its executions committed."""
        group = await triggers_group()
        last: Any = (await redis.xinfo_stream(keys.events()))["last-generated-id"]
        return bool(group and group["pending"] == 0 and group["last-delivered-id"] == last)

    async def all_published() -> bool:
        waiting = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        return bool(await scalar(fault_database_url, waiting) == 0)

    async def published_and_taken() -> bool:
        return await all_published() and await all_taken()

    try:
        matcher.start(0)
        relay.start(0)
        await wait_started(matcher)
        await wait_started(relay)
        await wait_until("the matcher made its group", group_made)
        await redis.save()  # the snapshot Redis will come back from

        # The matcher records executions (queued: no action worker runs) and takes the
        # relayed outbox rows; then, with no matcher, the relay publishes some more.
        await producer.run(direct)
        await commit_outbox(fault_database_url, outboxed[:TAKEN])
        await wait_until("the matcher took every event", published_and_taken)
        matcher.terminate(0)
        await commit_outbox(fault_database_url, outboxed[TAKEN:])
        await wait_until("the relay published every row", all_published)
        queued = await scalar(
            fault_database_url, "SELECT count(*) FROM workflow_executions WHERE status = 'queued'"
        )

        # Redis forgets all of that.
        await redis.aclose()
        fault_redis.kill()
        fault_redis.extra += ["--appendonly", "no"]  # load the snapshot, not the AOF
        fault_redis.start()
        assert await Redis.from_url(fault_redis.url).xlen(keys.commands()) == 0

        for slot in range(2):
            everyone.start(slot)
        report = await settle(
            fault_redis.url,
            fault_database_url,
            expected_of([*producer.accepted, *(e.id for e in outboxed)], wants),
            within=90,
        )
        crashed = [*everyone.crashed(), *relay.crashed()]
    finally:
        for running in (matcher, relay, everyone):
            running.stop_all()
    record(
        "Redis back from an older snapshot",
        len(direct) + len(outboxed),
        f"Redis restarted from a snapshot taken before the matcher and the relay ran:"
        f" {queued} queued executions lost their commands, {UNTAKEN} published outbox rows"
        f" their events; GOVFLOW_RECONCILE_AFTER={RECONCILE_AFTER}",
        report,
        started,
    )
    assert queued > 0
    assert crashed == [], everyone.tail()
    assert report.ok, f"{report.summary()}\n{everyone.tail()}"
