"""The operator's HTTP routes: cancel and retry an execution, pause and resume a group."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.api.app import create_app
from govflow.schemas.codec import decode_command, encode
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.api_helpers import API_TOKENS, THREE_STEPS, TOKENS, bearer, seed_execution, serving
from tests.pipeline_helpers import apply, fetch

pytestmark = pytest.mark.anyio

OPERATOR = f"api:{hashlib.sha256(TOKENS['operator'].encode()).hexdigest()[:8]}"


@pytest.fixture
async def client(make_settings: Callable[..., Settings]) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serving(create_app(make_settings(api_tokens=API_TOKENS))) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        yield http


async def test_cancel_then_retry_an_execution(
    client: httpx.AsyncClient, pool: AsyncConnectionPool[Any], redis: Redis, prefix: str
) -> None:
    await apply(pool, THREE_STEPS)
    exec_id = await seed_execution(
        pool, completed_steps=1, failed_step=(2, "boom"), status="retrying"
    )
    cancel, retry = f"/executions/{exec_id}/cancel", f"/executions/{exec_id}/retry"

    assert (await client.post(cancel, headers=bearer("reader"))).status_code == 403
    assert (await client.post(cancel, headers=bearer("operator"), content=b"{")).status_code == 400
    bad = await client.post(cancel, headers=bearer("operator"), json={"why": "x"})
    assert bad.status_code == 422
    done = await client.post(cancel, headers=bearer("operator"), json={"reason": "wrong policy"})
    assert done.status_code == 200, done.text
    body = done.json()
    assert (body["kind"], body["from_status"], body["actor"], body["reason"]) == (
        "cancel",
        "retrying",
        OPERATOR,
        "wrong policy",
    )
    again = await client.post(cancel, headers=bearer("operator"))
    assert (again.status_code, again.json()["detail"]) == (
        409,
        f"execution {exec_id}: already cancelled",
    )
    for unknown in (str(uuid.uuid4()), "not-a-uuid"):
        response = await client.post(f"/executions/{unknown}/cancel", headers=bearer("operator"))
        assert response.status_code == 404, unknown

    # The seeded execution's event was never received: its command cannot be rebuilt.
    refused = await client.post(retry, headers=bearer("operator"))
    assert refused.status_code == 409
    assert "its event is no longer kept" in refused.json()["detail"]
    event = new_event("policy.created", "POL-1", tenant="acme", id=f"evt-{exec_id}")
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO received_events (tenant, event_id, event) VALUES (%s, %s, %s)",
            (event.tenant, event.id, encode(event).decode()),
        )
    retried = await client.post(retry, headers=bearer("operator"), json={"reason": "fixed"})
    assert retried.status_code == 202, retried.text
    assert (retried.json()["kind"], retried.json()["from_status"]) == ("retry", "cancelled")
    entries: Any = await redis.xrange(Keys(prefix).commands())
    [(_, fields)] = entries
    command = decode_command(fields[b"command"])
    assert (command.execution_id, command.event.id) == (exec_id, event.id)
    shown = (await client.get(f"/executions/{exec_id}", headers=bearer("reader"))).json()
    assert shown["status"] == "queued"
    assert [(i["kind"], i["reason"]) for i in shown["interventions"]] == [
        ("cancel", "wrong policy"),
        ("retry", "fixed"),
    ]
    second = await client.post(retry, headers=bearer("operator"))
    assert second.status_code == 409
    assert "queued, not dead-lettered or cancelled" in second.json()["detail"]
    assert await redis.xlen(Keys(prefix).commands()) == 1


async def test_a_completed_execution_is_neither_cancelled_nor_retried(
    client: httpx.AsyncClient, pool: AsyncConnectionPool[Any]
) -> None:
    await apply(pool, THREE_STEPS)
    exec_id = await seed_execution(pool, completed_steps=3, status="completed")
    for verb, why in (("cancel", "already completed"), ("retry", "completed: nothing to retry")):
        response = await client.post(f"/executions/{exec_id}/{verb}", headers=bearer("admin"))
        assert (response.status_code, response.json()["detail"]) == (
            409,
            f"execution {exec_id}: {why}",
        )
    assert await fetch(pool, "SELECT count(*) FROM execution_interventions") == [(0,)]


async def test_pause_and_resume_a_group(client: httpx.AsyncClient) -> None:
    pause, resume = "/groups/actions/pause", "/groups/actions/resume"
    assert (await client.post(pause, headers=bearer("reader"))).status_code == 403
    first = await client.post(pause, headers=bearer("operator"), json={"reason": "deploy"})
    assert first.status_code == 200, first.text
    assert first.json()["changed"] is True
    assert (first.json()["pause"]["by"], first.json()["pause"]["reason"]) == (OPERATOR, "deploy")
    second = await client.post(pause, headers=bearer("admin"))
    assert (second.json()["changed"], second.json()["pause"]["reason"]) == (False, "deploy")

    lag = (await client.get("/lag", headers=bearer("reader"))).json()
    assert [p["group"] for p in lag["paused"]] == ["actions"]
    assert {g["group"]: g["paused"] for g in lag["groups"]} == {
        "triggers": False,
        "actions": True,
    }

    unknown = await client.post("/groups/relay/pause", headers=bearer("operator"))
    assert unknown.status_code == 404
    assert "triggers and actions" in unknown.json()["detail"]
    resumed = await client.post(resume, headers=bearer("operator"))
    assert (resumed.status_code, resumed.json()["changed"], resumed.json()["paused"]) == (
        200,
        True,
        False,
    )
    assert (await client.post(resume, headers=bearer("operator"))).json()["changed"] is False
    assert (await client.get("/lag", headers=bearer("reader"))).json()["paused"] == []
