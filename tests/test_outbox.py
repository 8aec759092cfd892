"""The transactional outbox as services use it: Python (async and sync), psql, Node.js.

A rolled-back transaction publishes nothing; a committed one is published by the relay
and its workflow runs; the backlog and its gauges say what waits and for how long.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import anyio
import msgspec
import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db.outbox import backlog
from govflow.producers.outbox import enqueue, enqueue_sync
from govflow.producers.relay import LOCK_KEY, Relay
from govflow.schemas.codec import decode_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.outbox_helpers import (
    ALL_ROLES,
    EXAMPLES,
    apply_workflows,
    create_policies,
    fetch,
    now,
    outbox_state,
    payloads,
    policy_created,
    run_once_problems,
    running_relay,
    scalar,
)
from tests.pipeline_helpers import running_worker, wait_for

pytestmark = pytest.mark.anyio

NODE_PRODUCER = EXAMPLES / "node-producer"
SQL_EXAMPLE = EXAMPLES / "outbox.sql"


async def published_ids(redis: Redis, keys: Keys) -> list[str]:
    return [decode_event(p).id for p in await payloads(redis, keys.events())]


class RollbackError(Exception):
    """Raised to roll a service's transaction back."""


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


async def test_a_rolled_back_transaction_publishes_nothing(
    settings: Settings, database_url: str, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    keys = Keys(settings.prefix)
    dropped, kept = policy_created("POL-1"), policy_created("POL-2")
    dropped_sync, kept_sync = policy_created("POL-3"), policy_created("POL-4")

    async def roll_back() -> None:
        async with pool.connection() as conn, conn.transaction():
            await enqueue(conn, dropped)
            raise RollbackError

    with pytest.raises(RollbackError):
        await roll_back()
    async with pool.connection() as conn, conn.transaction():
        await enqueue(conn, kept)
    with psycopg.connect(database_url) as sync_conn:  # Flask, Django: a plain connection
        enqueue_sync(sync_conn, dropped_sync)
        sync_conn.rollback()
        enqueue_sync(sync_conn, kept_sync)
        sync_conn.commit()

    relay = Relay(redis, pool, keys)
    async with running_relay(relay):
        # The committed events go out; by then the rolled-back ones would have too.
        ids = await wait_for(
            lambda: published_ids(redis, keys), lambda ids: len(ids) >= 2, within=10, what="2"
        )
    assert ids == [kept.id, kept_sync.id]
    assert await outbox_state(pool) == (2, 0)


async def test_backlog_counts_waiting_rows_and_their_age(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    """The backlog `govflow lag` reports (and `govflow serve` exports, tests/test_lag.py)."""
    keys = Keys(settings.prefix)
    async with pool.connection() as conn:
        assert await backlog(conn) == (0, None)
        await conn.execute(
            "INSERT INTO outbox (event, created_at) VALUES (%s::jsonb, now() - interval '5 s')",
            (msgspec.json.encode(policy_created("POL-1")).decode(),),
        )
        await enqueue(conn, policy_created("POL-2"))
        await conn.commit()
        waiting, age = await backlog(conn)
        await conn.commit()
    assert waiting == 2
    assert age is not None
    assert 5 <= age < 60

    async def waiting_rows() -> int:
        async with pool.connection() as conn:
            found, _ = await backlog(conn)
            await conn.commit()
        return found

    # Someone else holds the relay's lock: our relay stands by and publishes nothing.
    async with pool.connection() as holder:
        await holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        await holder.commit()
        relay = Relay(redis, pool, keys)
        async with running_relay(relay):
            await wait_for(
                lambda: now(relay.state), lambda s: s == "standby", within=10, what="standby"
            )
            assert gauge("govflow_outbox_relay_leader") == 0
            assert relay.published == 0
            assert await waiting_rows() == 2
            await holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            await holder.commit()
            await wait_for(waiting_rows, lambda n: n == 0, within=10, what="the leader to publish")
            assert relay.leading
    assert relay.published == 2
    async with pool.connection() as conn:
        assert await backlog(conn) == (0, None)


async def test_rows_inserted_with_psql_run_their_workflow(
    settings: Settings, database_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("no psql on this machine")
    await apply_workflows(pool)
    await create_policies(pool, "POL-1042")
    async with running_worker(settings, ALL_ROLES, concurrency=1):
        with anyio.fail_after(30):
            done = await anyio.run_process(
                [psql, database_url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(SQL_EXAMPLE)],
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode()
        await wait_for(
            lambda: outbox_state(pool), lambda s: s == (2, 0), within=20, what="published"
        )
        ids = [e for (e,) in await fetch(pool, "SELECT event ->> 'id' FROM outbox ORDER BY id")]
        await wait_for(
            lambda: run_once_problems(pool, ids), lambda p: not p, within=20, what="two runs"
        )
    assert await scalar(pool, "SELECT status FROM policies WHERE id = 'POL-1042'") == "approved"
    assert ids[0] == "0b6f6c9e-6a55-4f4e-9d7c-1f0e3f1b2a11"


@pytest.mark.slow
async def test_the_node_example_commits_an_event_that_runs(
    settings: Settings, database_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("no Node.js on this machine")
    with anyio.fail_after(300):
        install = await anyio.run_process(
            [npm, "install", "--no-audit", "--no-fund"], cwd=NODE_PRODUCER, check=False
        )
    assert install.returncode == 0, install.stderr.decode()
    await apply_workflows(pool)
    await create_policies(pool, "POL-7")

    async def producer(*args: str) -> tuple[int, str, str]:
        with anyio.fail_after(60):
            done = await anyio.run_process(
                [node, "index.mjs", *args],
                cwd=NODE_PRODUCER,
                env={**os.environ, "DATABASE_URL": database_url},
                check=False,
            )
        return done.returncode, done.stdout.decode().strip(), done.stderr.decode().strip()

    async with running_worker(settings, ALL_ROLES, concurrency=1):
        # No such policy: the transaction rolls back, and no event is left behind.
        assert await producer("POL-404", "pending_approval") == (
            1,
            "",
            "node-producer: no policy POL-404",
        )
        status, event_id, errors = await producer("POL-7", "pending_approval")
        assert status == 0, errors
        await wait_for(
            lambda: run_once_problems(pool, [event_id]),
            lambda p: not p,
            within=20,
            what="the Node.js event's workflow",
        )
    assert await outbox_state(pool) == (1, 0)
    (event,) = [e for (e,) in await fetch(pool, "SELECT event FROM outbox")]
    assert decode_event(msgspec.json.encode(event)).changes["status"].to == "pending_approval"
    assert (
        await scalar(pool, "SELECT status FROM policies WHERE id = 'POL-7'") == "pending_approval"
    )
