"""Webhooks as receivers in the field expect them, against a real local HTTP server.

- 408, 425, 429 and 5xx are retried; ``Retry-After`` (seconds or an HTTP date) sets the
  retry's time, up to ``GOVFLOW_BACKOFF_MAX``.
- Every webhook is signed: with no ``GOVFLOW_WEBHOOK_SECRET``, by the key ``govflow
  migrate`` made; after ``govflow webhooks secret --rotate`` by the new key and the old.
- Webhooks run outside the transaction: a database-only execution in the same batch as
  five held webhooks commits while they are held, and no session sits idle in transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.plugins.webhook import retry_after_seconds
from govflow.schemas.events import Event, new_event
from govflow.schemas.settings import Settings
from tests.ops_helpers import govflow, govflow_env
from tests.pipeline_helpers import (
    apply,
    fetch,
    publish,
    retry_due,
    running_worker,
    scalar,
    stream_state,
    wait_for,
    wait_settled,
)
from tests.webhook_server import Received, Reply, WebhookServer, serve

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: NAME
entity: policy
trigger: create
when: [{field: case, equals: NAME}]
actions:
  - notify: {webhook: "URL", message: "{data.title}"}
"""
DB_ONLY = """
name: db-only
entity: policy
trigger: create
when: [{field: case, equals: db-only}]
actions:
  - create_task: {title: "Review {data.title}"}
"""


def notify_workflow(name: str, url: str) -> str:
    return WORKFLOW.replace("NAME", name).replace("URL", url)


def case(name: str) -> Event:
    return new_event("policy.created", f"POL-{name}", data={"title": name, "case": name})


def header(received: Received, name: str) -> str:
    return {k.lower(): v for k, v in received.headers.items()}[name.lower()]


def signed(key: str, body: bytes) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    with serve() as server:
        yield server


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now) == 120
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90
    assert retry_after_seconds(format_datetime(now - timedelta(hours=1), usegmt=True), now) == 0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None


@pytest.mark.slow
async def test_408_425_429_and_5xx_are_retried(
    make_settings: Callable[..., Settings], redis: Redis, pool: AsyncConnectionPool[Any],
    webhook: WebhookServer,
) -> None:  # fmt: skip
    settings = make_settings()
    codes = (408, 425, 429, 503)
    for code in codes:
        await apply(
            pool, notify_workflow(f"s{code}", webhook.plan(f"/{code}", Reply(code), Reply(200)))
        )
    async with running_worker(settings):
        await publish(redis, settings.keys(), [case(f"s{code}") for code in codes])
        await wait_settled(pool, len(codes), within=30)
    for code in codes:
        first, second = webhook.requests_to(f"/{code}")
        assert header(first, "Idempotency-Key") == header(second, "Idempotency-Key")
    assert await fetch(pool, "SELECT attempts FROM workflow_executions") == [(2,)] * len(codes)


@pytest.mark.slow
async def test_retry_after_sets_the_retry_within_the_cap(
    make_settings: Callable[..., Settings], redis: Redis, pool: AsyncConnectionPool[Any],
    webhook: WebhookServer,
) -> None:  # fmt: skip
    settings = make_settings(backoff_max=60)
    keys = settings.keys()
    in_half_a_minute = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    await apply(
        pool,
        notify_workflow(
            "date", webhook.plan("/date", Reply(503, headers={"Retry-After": in_half_a_minute}))
        ),
    )
    await apply(
        pool,
        notify_workflow(
            "capped", webhook.plan("/capped", Reply(429, headers={"Retry-After": "7200"}))
        ),
    )
    before = time.time()
    async with running_worker(settings):
        await publish(redis, keys, [case("date"), case("capped")])
        scheduled = await wait_for(
            lambda: retry_due(redis, keys),
            lambda found: len(found) == 2,
            within=20,
            what="both retries scheduled",
        )
    after = time.time()
    date_due, capped_due = scheduled
    # The HTTP date, to its second; two hours asked, a minute allowed.
    assert before + 28 <= date_due <= after + 31
    assert before + 60 <= capped_due <= after + 60
    assert await stream_state(redis, keys) == {
        "triggers_pending": 0, "actions_pending": 0, "retry_scheduled": 2, "dead_stream": 0,
    }  # fmt: skip


@pytest.mark.slow
async def test_every_webhook_is_signed_and_a_rotation_signs_with_both_keys(
    make_settings: Callable[..., Settings], redis: Redis, pool: AsyncConnectionPool[Any],
    webhook: WebhookServer,
) -> None:  # fmt: skip
    settings = make_settings()  # no GOVFLOW_WEBHOOK_SECRET: the key migrate made signs
    assert settings.redis_url is not None
    assert settings.database_url is not None
    env = govflow_env(settings.redis_url, settings.database_url, settings.prefix)
    printed = await govflow(env, "webhooks", "secret")
    assert printed.returncode == 0, printed.stderr.decode()
    old = printed.stdout.decode().strip()
    assert old == await scalar(pool, "SELECT secret FROM webhook_keys")
    await apply(pool, notify_workflow("before", webhook.plan("/before", Reply(200))))
    await apply(pool, notify_workflow("after", webhook.plan("/after", Reply(200))))

    async with running_worker(settings):
        await publish(redis, settings.keys(), [case("before")])
        await wait_settled(pool, 1, within=20)
    (sent,) = webhook.requests_to("/before")
    assert header(sent, "X-Govflow-Signature") == signed(old, sent.body)

    rotated = await govflow(env, "webhooks", "secret", "--rotate")
    assert rotated.returncode == 0, rotated.stderr.decode()
    new = rotated.stdout.decode().strip()
    assert new.startswith("whsec_")
    assert new != old
    async with running_worker(settings):
        await publish(redis, settings.keys(), [case("after")])
        await wait_settled(pool, 2, within=20)
    (sent,) = webhook.requests_to("/after")
    # The new key first; the old one too, while its grace lasts.
    assert (
        header(sent, "X-Govflow-Signature") == f"{signed(new, sent.body)},{signed(old, sent.body)}"
    )
    now = await govflow(env, "webhooks", "secret")
    assert now.stdout.decode().strip() == new


@pytest.mark.slow
async def test_a_database_only_execution_commits_while_webhooks_are_held(
    make_settings: Callable[..., Settings], redis: Redis, pool: AsyncConnectionPool[Any],
    webhook: WebhookServer,
) -> None:  # fmt: skip
    settings = make_settings(webhook_timeout=60)
    slow = [f"slow{i}" for i in range(5)]
    for name in slow:
        await apply(pool, notify_workflow(name, webhook.plan(f"/{name}", Reply(200, hold=True))))
    await apply(pool, DB_ONLY)
    # The matcher first, alone: all six commands then wait on the stream, and the one
    # action consumer reads them as one batch.
    async with running_worker(settings, frozenset({"triggers"})):
        await publish(redis, settings.keys(), [*(case(n) for n in slow), case("db-only")])
        await wait_for(
            lambda: redis.xlen(settings.keys().commands()),
            lambda n: n == 6,
            within=20,
            what="six commands",
        )
    async with running_worker(settings, frozenset({"actions"}), concurrency=1):
        await wait_for(
            lambda: arrived(webhook, slow),
            lambda n: n == 5,
            within=20,
            what="five webhooks in flight",
        )
        # All five are held by the receiver now: the database-only execution is done...
        assert await fetch(
            pool, "SELECT workflow_name, status FROM workflow_executions WHERE status <> 'running'"
        ) == [("db-only", "completed")]
        # ...and no session waits in an open transaction for a receiver.
        idle = await fetch(
            pool,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%%'",
        )
        assert idle == [(0,)]
        released_at = await scalar(pool, "SELECT clock_timestamp()")
        webhook.release()
        await wait_settled(pool, 6, within=30)
    rows = dict(await fetch(pool, "SELECT workflow_name, finished_at FROM workflow_executions"))
    # finished_at is when each commit happened: the webhooks' after they were answered.
    assert all(rows[name] > released_at > rows["db-only"] for name in slow)
    assert await scalar(pool, "SELECT count(*) FROM notifications") == 5


async def arrived(webhook: WebhookServer, paths: list[str]) -> int:
    """How many of ``paths`` received their request."""
    return sum(len(webhook.requests_to(f"/{p}")) for p in paths)
