"""The outbox relay against real Redis and Postgres: order, once-only, outages, crashes, leaders.

Services commit events through the outbox; a ``Worker`` (or a relay process of its own,
to be SIGKILLed) publishes them; the checks read the streams and the execution rows.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db.outbox import enqueue
from govflow.producers.relay import APPLICATION_NAME, Relay
from govflow.schemas.codec import decode_event
from govflow.schemas.events import Event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.faults.servers import redis_server
from tests.outbox_helpers import (
    ALL_ROLES,
    apply_workflows,
    commit_policies,
    completed_events,
    exit_status,
    fetch,
    now,
    outbox_state,
    payloads,
    policy_created,
    run_once_problems,
    scalar,
    start_relay_process,
    status_changed,
    stop_process,
    stream_ids,
)
from tests.pipeline_helpers import running_worker, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

STATUSES = ("draft", "pending_approval", "under_review", "approved", "retired", "archived")


async def outbox_ids_of_partition(pool: AsyncConnectionPool[Any], keys: Keys, p: int) -> list[str]:
    """The event ids of one partition's outbox rows, in row id order."""
    rows = await fetch(pool, "SELECT event ->> 'id', event ->> 'entity_id' FROM outbox ORDER BY id")
    return [event_id for event_id, entity_id in rows if keys.partition_of(entity_id) == p]


async def drained(redis: Redis, stream: str, group: str) -> bool:
    """Has ``group`` been delivered every entry of ``stream`` and acknowledged them all?"""
    info = await redis.xinfo_stream(stream)
    for g in await redis.xinfo_groups(stream):
        if g["name"].decode() == group:
            return bool(g["pending"] == 0 and g["last-delivered-id"] == info["last-generated-id"])
    return False


async def relay_sessions(pool: AsyncConnectionPool[Any], *, waiting_on_lock: bool = False) -> int:
    """Sessions of relays (any process) on this test's database."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s"
    )
    if waiting_on_lock:
        query += " AND wait_event_type = 'Lock'"
    return int(await scalar(pool, query, APPLICATION_NAME))


async def relay_lock_holders(pool: AsyncConnectionPool[Any]) -> list[int]:
    """The pids of sessions holding an advisory lock on this test's database."""
    rows = await fetch(
        pool,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    return [pid for (pid,) in rows]


def relay_errors(server: str) -> float:
    return REGISTRY.get_sample_value("govflow_outbox_relay_errors_total", {"server": server}) or 0.0


@pytest.mark.parametrize("partitions", [1, 3])
async def test_committed_rows_are_published_in_id_order_and_run_once(
    make_settings: Any, pool: AsyncConnectionPool[Any], redis: Redis, partitions: int
) -> None:
    settings: Settings = make_settings(partitions=partitions)
    keys = Keys(settings.prefix, partitions)
    await apply_workflows(pool)
    entities = [f"POL-{i}" for i in range(10)]
    events: list[Event] = []
    async with running_worker(settings, ALL_ROLES, concurrency=1):
        # Six service transactions of ten events; each entity is created, then changes
        # status five times, so per-entity order is visible in the streams.
        for n, (before, after) in enumerate(zip(("new", *STATUSES), STATUSES, strict=False)):
            batch = [
                policy_created(e, n) if before == "new" else status_changed(e, before, after)
                for e in entities
            ]
            await commit_policies(pool, batch)
            events += batch
        await wait_for(
            lambda: outbox_state(pool), lambda s: s == (60, 0), within=20, what="all published"
        )
        await wait_for(
            lambda: completed_events(pool), lambda n: n == 60, within=30, what="60 executions"
        )
    for p in keys.all_partitions():
        assert await stream_ids(redis, keys.events(p)) == await outbox_ids_of_partition(
            pool, keys, p
        )
    published = [
        decode_event(payload)
        for p in keys.all_partitions()
        for payload in await payloads(redis, keys.events(p))
    ]
    assert sorted(published, key=lambda e: e.id) == sorted(events, key=lambda e: e.id)
    assert await run_once_problems(pool, [e.id for e in events]) == []


async def test_rows_that_are_not_events_are_published_as_is_and_dead_lettered(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    keys = Keys(settings.prefix)
    await apply_workflows(pool)
    not_events = [
        '{"type": "policy.created", "entity_id": "POL-1"}',  # no id, tenant, occurred_at
        "[1, 2]",
        '"only a string"',
        '{"id": 5, "entity_id": 7, "type": "policy.exploded"}',
    ]
    good = policy_created("POL-2")
    async with pool.connection() as conn, conn.transaction():
        for raw in not_events:
            await conn.execute("INSERT INTO outbox (event) VALUES (%s::jsonb)", (raw,))
        await enqueue(conn, good)
    async with running_worker(settings, ALL_ROLES, concurrency=1):
        await wait_for(
            lambda: scalar(pool, "SELECT count(*) FROM dead_letters"),
            lambda n: n == len(not_events),
            within=20,
            what="the rows that are not events dead-lettered",
        )
        await wait_for(lambda: completed_events(pool), lambda n: n == 1, within=20, what="one run")
    published = await payloads(redis, keys.events())
    # Published in row order, each as its row's JSON without jsonb's spaces.
    assert published[:3] == [
        b'{"type":"policy.created","entity_id":"POL-1"}',
        b"[1,2]",
        b'"only a string"',
    ]
    assert msgspec.json.decode(published[3]) == msgspec.json.decode(not_events[3])
    assert decode_event(published[4]) == good
    reasons = [r for (r,) in await fetch(pool, "SELECT error FROM dead_letters ORDER BY id")]
    assert all(reasons), reasons
    assert await outbox_state(pool) == (5, 0)
    assert await run_once_problems(pool, [good.id]) == []


@pytest.mark.faults
async def test_redis_stopped_while_a_service_commits_then_every_event_runs_once(
    make_settings: Any, pool: AsyncConnectionPool[Any], tmp_path: Path
) -> None:
    await apply_workflows(pool)
    before = [policy_created(f"POL-{i}", i) for i in range(10)]
    during = [policy_created(f"POL-{i}", i) for i in range(10, 30)]
    with redis_server(tmp_path / "redis") as server:
        settings: Settings = make_settings(redis_url=server.url)
        keys = Keys(settings.prefix)
        async with running_worker(settings, ALL_ROLES, concurrency=1):
            for event in before:
                await commit_policies(pool, [event])
            await wait_for(
                lambda: outbox_state(pool), lambda s: s == (10, 0), within=20, what="published"
            )
            server.kill()
            failures = relay_errors("redis")
            for event in during:  # the service keeps committing: Postgres is up
                await commit_policies(pool, [event])
            await wait_for(
                lambda: now(relay_errors("redis")),
                lambda n: n > failures,
                within=20,
                what="the relay to fail to reach Redis",
            )
            # Nothing that Redis did not take is marked published.
            assert await outbox_state(pool) == (10, 20)
            server.start()
            await wait_for(
                lambda: outbox_state(pool), lambda s: s == (30, 0), within=30, what="published"
            )
            await wait_for(
                lambda: completed_events(pool), lambda n: n == 30, within=30, what="30 runs"
            )
            client = Redis.from_url(server.url)
            try:
                published = await stream_ids(client, keys.events())
            finally:
                await client.aclose()
    assert sorted(set(published)) == sorted(e.id for e in before + during)
    assert await run_once_problems(pool, [e.id for e in before + during]) == []


@pytest.mark.faults
async def test_relay_killed_between_xadd_and_marking_then_restarted(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis, tmp_path: Path
) -> None:
    keys = Keys(settings.prefix)
    await apply_workflows(pool)
    events = [policy_created(f"POL-{i}", i) for i in range(40)]
    row_ids = await commit_policies(pool, events)
    log = tmp_path / "relay.log"
    async with running_worker(settings, concurrency=1):
        # A lock on the batch's last row: the relay XADDs the whole batch, then its
        # UPDATE waits. That is the instant the relay gets SIGKILLed.
        async with pool.connection() as blocker:
            await blocker.execute("SELECT 1 FROM outbox WHERE id = %s FOR UPDATE", (row_ids[-1],))
            relay = start_relay_process(settings, log)
            try:
                await wait_for(
                    lambda: redis.xlen(keys.events()), lambda n: n == 40, within=20, what="XADDs"
                )
                await wait_for(
                    lambda: relay_sessions(pool, waiting_on_lock=True),
                    lambda n: n == 1,
                    within=10,
                    what="the relay's UPDATE waiting on the row lock",
                )
                relay.send_signal(signal.SIGKILL)
                assert await exit_status(relay) == -signal.SIGKILL
            finally:
                stop_process(relay)
            # The server notices the vanished client and rolls its transaction back.
            await wait_for(
                lambda: relay_sessions(pool), lambda n: n == 0, within=15, what="sessions gone"
            )
            await blocker.rollback()
        assert await outbox_state(pool) == (0, 40), "published but never marked"
        relay = start_relay_process(settings, log)
        try:
            await wait_for(
                lambda: outbox_state(pool), lambda s: s == (40, 0), within=20, what="republished"
            )
            assert await redis.xlen(keys.events()) == 80  # every row went out twice
            await wait_for(
                lambda: drained(redis, keys.events(), "triggers"),
                bool,
                within=30,
                what="both copies of every event handled",
            )
            await wait_for(
                lambda: completed_events(pool), lambda n: n == 40, within=30, what="40 runs"
            )
            relay.send_signal(signal.SIGTERM)
            assert await exit_status(relay) == 0, log.read_text()
        finally:
            stop_process(relay)
    assert await stream_ids(redis, keys.events()) == [e.id for e in events] * 2
    assert await run_once_problems(pool, [e.id for e in events]) == []


async def test_two_relays_at_once_one_publishes_in_order(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    keys = Keys(settings.prefix)
    relays = [Relay(redis, pool, keys, poll_s=0.5), Relay(redis, pool, keys, poll_s=0.5)]
    both_led = False

    async def progress() -> tuple[int, int]:
        nonlocal both_led
        both_led |= all(r.leading for r in relays)
        return await outbox_state(pool)

    events = [policy_created(f"POL-{i % 7}", i) for i in range(100)]
    async with anyio.create_task_group() as tg:
        for relay in relays:
            tg.start_soon(relay.run)
        for start in range(0, 50, 5):
            await commit_policies(pool, events[start : start + 5])
        await wait_for(progress, lambda s: s == (50, 0), within=20, what="the first 50")
        assert sorted(r.published for r in relays) == [0, 50]
        # The leader's connection dies: whoever wins the lock next carries on.
        (holder,) = await relay_lock_holders(pool)
        await fetch(pool, "SELECT pg_terminate_backend(%s)", holder)
        for start in range(50, 100, 5):
            await commit_policies(pool, events[start : start + 5])
        await wait_for(progress, lambda s: s == (100, 0), within=20, what="the next 50")
        # The relay that lost its connection reconnected; one leads, the other stands by.
        await wait_for(
            lambda: now(sorted(r.state for r in relays)),
            lambda states: states == ["leading", "standby"],
            within=10,
            what="a leader and a standby again",
        )
        for relay in relays:
            relay.stop()
    assert not both_led
    assert sum(r.published for r in relays) == 100
    assert await stream_ids(redis, keys.events()) == [e.id for e in events]


@pytest.mark.faults
async def test_standby_takes_over_when_the_leader_process_is_killed(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis, tmp_path: Path
) -> None:
    keys = Keys(settings.prefix)
    events = [policy_created(f"POL-{i % 5}", i) for i in range(40)]
    leader = start_relay_process(settings, tmp_path / "relay.log")
    try:
        await wait_for(
            lambda: relay_lock_holders(pool), lambda p: len(p) == 1, within=20, what="a leader"
        )
        standby = Relay(redis, pool, keys)
        async with anyio.create_task_group() as tg:
            tg.start_soon(standby.run)
            for event in events[:20]:
                await commit_policies(pool, [event])
            await wait_for(
                lambda: outbox_state(pool), lambda s: s == (20, 0), within=20, what="20 rows"
            )
            assert (standby.leading, standby.published) == (False, 0)
            leader.send_signal(signal.SIGKILL)
            assert await exit_status(leader) == -signal.SIGKILL
            killed = time.monotonic()
            await wait_for(lambda: now(standby.leading), bool, within=10, what="a takeover")
            takeover_s = time.monotonic() - killed
            for event in events[20:]:
                await commit_policies(pool, [event])
            await wait_for(
                lambda: outbox_state(pool), lambda s: s == (40, 0), within=20, what="40 rows"
            )
            standby.stop()
    finally:
        stop_process(leader)
    assert takeover_s < 5
    assert standby.published == 20
    assert await stream_ids(redis, keys.events()) == [e.id for e in events]


async def test_published_rows_are_deleted_after_the_retention(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    keys = Keys(settings.prefix)
    events = [policy_created(f"POL-{i}", i) for i in range(5)]
    await commit_policies(pool, events)
    relay = Relay(redis, pool, keys, retention_s=0.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await wait_for(
            lambda: outbox_state(pool), lambda s: s == (5, 0), within=10, what="5 published"
        )
        # Published is not enough: a row stays until its event is known to be taken up
        # (the reconciler marks it), so that it can be published again should Redis lose it.
        await anyio.sleep(1.5)
        assert await scalar(pool, "SELECT count(*) FROM outbox") == 5
        await scalar(pool, "UPDATE outbox SET taken_at = now() RETURNING 1")
        await wait_for(
            lambda: scalar(pool, "SELECT count(*) FROM outbox"),
            lambda n: n == 0,
            within=10,
            what="taken rows deleted",
        )
        relay.stop()
    assert relay.published == 5
    assert await stream_ids(redis, keys.events()) == [e.id for e in events]
