"""The ``notify`` action against a real HTTP server: retries, signatures, permanent failures.

README.md, "Guarantees": a webhook is delivered at least once, always with the same ``Idempotency-Key``, and
signed with HMAC-SHA256; a 4xx is permanent; a timeout, a connection error or a 5xx is
retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.schemas.commands import execution_id
from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys
from tests.pipeline_helpers import (
    apply,
    fetch,
    publish,
    running_worker,
    scalar,
    stream_state,
    wait_for,
    wait_settled,
)
from tests.webhook_server import Reply, WebhookServer, serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECRET = "s3cret-for-tests"
WORKFLOW = """
name: NAME
entity: policy
trigger: create
when: [{field: case, equals: NAME}]
actions:
  - create_task: {title: "Review {data.title}"}
  - notify: {webhook: "URL", message: "{data.title} needs approval"}
  - assign: {assignee: risk-team}
"""


def notify_workflow(name: str, url: str) -> str:
    return WORKFLOW.replace("NAME", name).replace("URL", url)


def case(name: str) -> Event:
    return new_event(
        "policy.created", f"POL-{name}", data={"title": f"Policy {name}", "case": name}
    )


def header(received: Any, name: str) -> str | None:
    found = {k.lower(): v for k, v in received.headers.items()}
    return found.get(name.lower())


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    with serve() as server:
        yield server


async def execution_row(pool: AsyncConnectionPool[Any], exec_id: str) -> tuple[Any, ...]:
    (row,) = await fetch(
        pool,
        "SELECT status, attempts, last_error FROM workflow_executions WHERE id = %s",
        exec_id,
    )
    return row


async def step_rows(pool: AsyncConnectionPool[Any], exec_id: str) -> dict[int, tuple[str, int]]:
    rows = await fetch(
        pool, "SELECT step, status, attempts FROM execution_steps WHERE execution_id = %s", exec_id
    )
    return {step: (status, attempts) for step, status, attempts in rows}


async def wait_dead_lettered(pool: AsyncConnectionPool[Any], redis: Redis, keys: Keys) -> None:
    """Wait until the one execution is dead-lettered and its dead letter handed over."""
    await wait_settled(pool, 1, status="dead_lettered", within=20)
    await wait_for(
        lambda: stream_state(redis, keys),
        lambda s: s["dead_stream"] == 1 and s["actions_pending"] == 0,
        within=10,
        what="the dead letter on the dead-letter stream",
    )


async def test_transient_failures_are_retried_with_one_key_and_a_valid_signature(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], webhook: WebhookServer
) -> None:
    settings = make_settings(webhook_secret=SECRET)
    keys = Keys(settings.prefix)
    url = webhook.plan("/flaky", Reply(500), Reply(500), Reply(200))
    await apply(pool, notify_workflow("flaky", url))
    event = case("flaky")
    exec_id = execution_id(event.tenant, event.id, "flaky")

    async with running_worker(settings):
        await publish(redis, keys, [event])
        await wait_settled(pool, 1, within=20)

    sent = webhook.requests_to("/flaky")
    assert len(sent) == 3
    assert {header(r, "Idempotency-Key") for r in sent} == {f"{exec_id}:2"}
    for r in sent:
        expected = hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
        assert header(r, "X-Govflow-Signature") == f"sha256={expected}"
    body = json.loads(sent[0].body)
    assert body["execution_id"] == exec_id
    assert body["event_id"] == event.id
    assert body["message"] == "Policy flaky needs approval"
    assert await fetch(
        pool, "SELECT idempotency_key, response_status, webhook FROM notifications"
    ) == [(f"{exec_id}:2", 200, url)]
    assert await execution_row(pool, exec_id) == ("completed", 3, None)
    # The task before the webhook was created once and not redone by the retries.
    assert await step_rows(pool, exec_id) == {
        1: ("completed", 1),
        2: ("completed", 3),
        3: ("completed", 1),
    }
    assert await scalar(pool, "SELECT count(*) FROM tasks") == 1
    assert await scalar(pool, "SELECT count(*) FROM assignments") == 1


async def test_a_4xx_is_permanent_and_dead_letters_after_one_attempt(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], webhook: WebhookServer
) -> None:
    settings = make_settings(webhook_secret=SECRET)
    keys = Keys(settings.prefix)
    await apply(pool, notify_workflow("gone", webhook.plan("/gone", Reply(410))))
    event = case("gone")
    exec_id = execution_id(event.tenant, event.id, "gone")

    async with running_worker(settings):
        await publish(redis, keys, [event])
        await wait_dead_lettered(pool, redis, keys)

    assert len(webhook.requests_to("/gone")) == 1
    status, attempts, last_error = await execution_row(pool, exec_id)
    assert (status, attempts) == ("dead_lettered", 1)
    assert "410" in last_error
    (letter,) = await fetch(
        pool, "SELECT error, attempts, execution_id::text, stream, payload FROM dead_letters"
    )
    assert "410" in letter[0]
    assert letter[1:4] == (1, exec_id, keys.commands())
    assert json.loads(letter[4]["command"])["execution_id"] == exec_id
    assert await step_rows(pool, exec_id) == {1: ("completed", 1), 2: ("failed", 1)}
    assert await scalar(pool, "SELECT count(*) FROM assignments") == 0
    assert await stream_state(redis, keys) == {
        "triggers_pending": 0, "actions_pending": 0, "retry_scheduled": 0, "dead_stream": 1,
    }  # fmt: skip


async def test_a_timeout_is_retried(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], webhook: WebhookServer
) -> None:
    settings = make_settings(webhook_secret=SECRET, webhook_timeout=0.5)
    keys = Keys(settings.prefix)
    url = webhook.plan("/slow", Reply(200, delay=2.0), Reply(200))
    await apply(pool, notify_workflow("slow", url))
    event = case("slow")
    exec_id = execution_id(event.tenant, event.id, "slow")

    async with running_worker(settings):
        await publish(redis, keys, [event])
        await wait_settled(pool, 1, within=20)

    sent = webhook.requests_to("/slow")
    assert len(sent) == 2
    assert {header(r, "Idempotency-Key") for r in sent} == {f"{exec_id}:2"}
    assert await execution_row(pool, exec_id) == ("completed", 2, None)
    assert await fetch(pool, "SELECT response_status FROM notifications") == [(200,)]


async def test_a_redirect_to_another_host_is_refused(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], webhook: WebhookServer
) -> None:
    settings = make_settings(webhook_secret=SECRET)
    keys = Keys(settings.prefix)
    elsewhere = webhook.url("/elsewhere", host="localhost")  # the same server, another name
    url = webhook.plan("/moved", Reply(307, location=elsewhere))
    webhook.plan("/elsewhere", Reply(200))
    await apply(pool, notify_workflow("moved", url))
    event = case("moved")
    exec_id = execution_id(event.tenant, event.id, "moved")

    async with running_worker(settings):
        await publish(redis, keys, [event])
        await wait_dead_lettered(pool, redis, keys)

    assert len(webhook.requests_to("/moved")) == 1
    assert webhook.requests_to("/elsewhere") == []
    status, attempts, last_error = await execution_row(pool, exec_id)
    assert (status, attempts) == ("dead_lettered", 1)
    assert "another host" in last_error
    assert await scalar(pool, "SELECT count(*) FROM notifications") == 0


async def test_a_redirect_within_the_host_is_followed(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], webhook: WebhookServer
) -> None:
    settings = make_settings(webhook_secret=SECRET)
    keys = Keys(settings.prefix)
    url = webhook.plan("/hop", Reply(308, location="/landing"))
    webhook.plan("/landing", Reply(202))
    await apply(pool, notify_workflow("hop", url))
    event = case("hop")
    exec_id = execution_id(event.tenant, event.id, "hop")

    async with running_worker(settings):
        await publish(redis, keys, [event])
        await wait_settled(pool, 1, within=20)

    (landed,) = webhook.requests_to("/landing")
    assert header(landed, "Idempotency-Key") == f"{exec_id}:2"
    assert await fetch(pool, "SELECT response_status FROM notifications") == [(202,)]
