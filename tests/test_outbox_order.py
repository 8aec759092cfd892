"""The relay publishes outbox rows in id order, even when their transactions commit out of it.

Each test opens service transactions of its own (plain SQL, as any service would), commits
them out of id order, and reads the event stream a running relay fills.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.producers.relay import Relay
from govflow.schemas.codec import encode
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.outbox_helpers import outbox_state, policy_created, running_relay, stream_ids
from tests.pipeline_helpers import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

INSERT = "INSERT INTO outbox (event) VALUES (%s::jsonb) RETURNING id"
QUIET_S = 1.5  # several relay polls: what the relay had not published by then, it held


@contextlib.asynccontextmanager
async def service(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A service's own connection; its transaction is left open until the test commits."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        yield conn


async def insert(conn: psycopg.AsyncConnection[Any], event_id: str) -> int:
    """Insert one event of entity POL-1 with plain SQL; return its row id."""
    event = msgspec.structs.replace(policy_created("POL-1"), id=event_id)
    cur = await conn.execute(INSERT, (encode(event).decode(),))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def published(redis: Redis, settings: Settings) -> list[str]:
    return await stream_ids(redis, Keys(settings.prefix).events())


async def test_a_row_that_commits_late_is_not_overtaken_by_a_higher_id(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis, database_url: str
) -> None:
    relay = Relay(redis, pool, Keys(settings.prefix), poll_s=0.2)
    async with running_relay(relay), service(database_url) as t1, service(database_url) as t2:
        first = await insert(t1, "first")
        second = await insert(t2, "second")
        assert first < second
        await t2.commit()  # the higher id commits first
        await anyio.sleep(QUIET_S)
        assert await published(redis, settings) == [], "the higher id overtook an open one"
        await t1.commit()
        await wait_for(lambda: outbox_state(pool), lambda s: s == (2, 0), within=10, what="both")
    assert await published(redis, settings) == ["first", "second"]


async def test_a_long_unrelated_transaction_does_not_hold_the_relay_back(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis, database_url: str
) -> None:
    relay = Relay(redis, pool, Keys(settings.prefix), poll_s=0.2)
    async with (
        running_relay(relay),
        service(database_url) as batch_job,
        service(database_url) as t1,
    ):
        # A write elsewhere in the database, left open: it holds an xid the whole time.
        await batch_job.execute("CREATE TEMP TABLE scratch (n int)")
        await batch_job.execute("SELECT pg_current_xact_id()")
        await insert(t1, "only")
        await t1.commit()
        await wait_for(lambda: outbox_state(pool), lambda s: s == (1, 0), within=10, what="it")
        await batch_job.rollback()
    assert await published(redis, settings) == ["only"]


async def test_an_outbox_transaction_left_open_holds_rows_back_only_up_to_the_bound(
    settings: Settings, pool: AsyncConnectionPool[Any], redis: Redis, database_url: str
) -> None:
    relay = Relay(redis, pool, Keys(settings.prefix), poll_s=0.2, order_wait_s=1.0)
    async with running_relay(relay), service(database_url) as stuck, service(database_url) as t2:
        await insert(stuck, "late")
        await insert(t2, "waited")
        await t2.commit()
        await wait_for(
            lambda: outbox_state(pool), lambda s: s == (1, 0), within=10, what="the bound"
        )
        assert await published(redis, settings) == ["waited"]
        await stuck.commit()  # past the bound: it goes out when it commits, after all
        await wait_for(lambda: outbox_state(pool), lambda s: s == (2, 0), within=10, what="both")
    assert await published(redis, settings) == ["waited", "late"]
