"""The HTTP API against real servers: every endpoint, status code and scope.

Each test serves ``create_app`` under uvicorn on a free loopback port and talks to it
with httpx, as a client would; the rows it reads are written with govflow's queries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import structlog
from openapi_spec_validator import validate
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.api.app import create_app
from govflow.api.auth import TokenAuth
from govflow.db import dead_letters, views
from govflow.operations import lag
from govflow.producers.publish import Publisher
from govflow.schemas import codec
from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.api_helpers import (
    API_TOKENS,
    THREE_STEPS,
    TOKENS,
    bearer,
    seed_execution,
    serving,
)
from tests.decision_helpers import seed_approval, seed_task
from tests.pipeline_helpers import apply, running_worker, wait_for

pytestmark = pytest.mark.anyio

GOVFLOW = Path(sys.executable).parent / "govflow"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


class Api(msgspec.Struct):
    client: httpx.AsyncClient
    settings: Settings
    keys: Keys


@pytest.fixture
async def api(make_settings: Callable[..., Settings]) -> AsyncIterator[Api]:
    """The API of this test's prefix and database, served on a loopback port."""
    settings = make_settings(api_tokens=API_TOKENS)
    async with (
        serving(create_app(settings)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield Api(client, settings, Keys(settings.prefix))


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def stream_events(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    entries: Any = await redis.xrange(keys.events())
    return [json.loads(fields[b"event"]) for _, fields in entries]


# POST /events -------------------------------------------------------------------------------


async def test_publish_accepts_an_event_and_adds_it_to_the_stream(api: Api, redis: Redis) -> None:
    minimal = {"type": "policy.created", "tenant": "acme", "entity_id": "POL-1"}
    response = await api.client.post("/events", json=minimal, headers=bearer("publisher"))
    assert response.status_code == 202, response.text
    first = response.json()["id"]
    assert str(uuid.UUID(first)) == first

    full = {
        **minimal,
        "id": "evt-42",
        "occurred_at": "2026-11-28T09:30:00Z",
        "actor": "user-17",
        "data": {"title": "Access control", "risk": "high"},
        "changes": {"status": {"from": "draft", "to": "pending_approval"}},
    }
    response = await api.client.post("/events", json=full, headers=bearer("admin"))
    assert response.status_code == 202, response.text
    assert response.json() == {"id": "evt-42"}

    published = await stream_events(redis, api.keys)
    assert [e["id"] for e in published] == [first, "evt-42"]
    assert published[0]["occurred_at"]  # filled like `govflow publish` does
    assert published[1]["occurred_at"] == "2026-11-28T09:30:00Z"
    assert published[1]["changes"] == {"status": {"from": "draft", "to": "pending_approval"}}
    assert published[1]["data"] == {"title": "Access control", "risk": "high"}


@pytest.mark.parametrize(
    ("headers", "status", "challenge"),
    [
        ({}, 401, "Bearer"),
        ({"Authorization": "Bearer nope"}, 401, 'Bearer error="invalid_token"'),
        ({"Authorization": f"Bearer {TOKENS['publisher'][:-1]}"}, 401, "Bearer"),
        ({"Authorization": f"Basic {TOKENS['publisher']}"}, 401, "Bearer"),
        ({"Authorization": "Bearer"}, 401, "Bearer"),
        (bearer("reader"), 403, 'Bearer error="insufficient_scope" scope="publish"'),
        (bearer("operator"), 403, 'Bearer error="insufficient_scope" scope="publish"'),
    ],
)
async def test_publish_needs_a_token_with_the_publish_scope(
    api: Api, redis: Redis, headers: dict[str, str], status: int, challenge: str
) -> None:
    event = {"type": "policy.created", "tenant": "acme", "entity_id": "POL-1"}
    response = await api.client.post("/events", json=event, headers=headers)
    assert response.status_code == status
    assert response.headers["WWW-Authenticate"].startswith(challenge)
    assert response.json()["detail"]
    assert await stream_events(redis, api.keys) == []


@pytest.mark.parametrize(
    ("body", "status", "key"),
    [
        ({"type": 1, "tenant": "acme", "entity_id": "P"}, 422, "type"),
        ({"type": "policy.renamed", "tenant": "acme", "entity_id": "P"}, 422, "type"),
        ({"type": "policy.created", "tenant": "acme"}, 422, "entity_id"),
        ({"type": "policy.created", "tenant": "acme", "entity_id": ""}, 422, "entity_id"),
        ({"type": "policy.created", "tenant": "a\u0000b", "entity_id": "P"}, 422, "tenant"),
        (
            {"type": "policy.created", "tenant": "acme", "entity_id": "P", "occurred_at": "soon"},
            422,
            "occurred_at",
        ),
        (
            {"type": "policy.updated", "tenant": "a", "entity_id": "P", "changes": {"x": {"f": 1}}},
            422,
            "changes[...]",
        ),
        (
            {"type": "policy.created", "tenant": "a", "entity_id": "P", "schema_version": 2},
            422,
            "schema_version",
        ),
        ([], 422, None),
        (b"not json", 400, None),
        (b'{"type": "\xff"}', 400, None),
        (b"", 400, None),
    ],
)
async def test_an_invalid_event_gets_a_4xx_naming_the_field(
    api: Api, redis: Redis, body: Any, status: int, key: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await api.client.post(
        "/events",
        content=content,
        headers={**bearer("publisher"), "Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()
    assert error["status_code"] == status
    assert error["detail"]
    if key is not None:
        assert error["extra"][0]["key"] == key
        assert error["extra"][0]["message"]
    assert await stream_events(redis, api.keys) == []


async def test_a_body_over_256_kib_gets_413(api: Api, redis: Redis) -> None:
    event = {
        "type": "policy.created",
        "tenant": "a",
        "entity_id": "P",
        "data": {"x": "y" * 300_000},
    }
    response = await api.client.post("/events", json=event, headers=bearer("publisher"))
    assert response.status_code == 413
    assert response.json()["status_code"] == 413

    # Without a Content-Length (chunked), the limit holds while the body streams in.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"type": "policy.created", "tenant": "a", "entity_id": "P", "data": {"x": "'
        for _ in range(40):
            yield b"y" * 8192
        yield b'"}}'

    response = await api.client.post("/events", content=chunks(), headers=bearer("publisher"))
    assert response.status_code == 413
    assert await stream_events(redis, api.keys) == []


# GET /executions, /executions/{id} ------------------------------------------------------------


async def test_executions_filter_and_page(api: Api, pool: AsyncConnectionPool[Any]) -> None:
    await apply(pool, THREE_STEPS)
    done = [
        await seed_execution(pool, entity_id=f"POL-{n}", completed_steps=3, status="completed")
        for n in range(3)
    ]
    dead = await seed_execution(
        pool, entity_id="POL-9", failed_step=(1, "webhook answered 404"), status="dead_lettered"
    )
    client = api.client

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/executions", params=params, headers=bearer("reader"))
        assert response.status_code == 200, response.text
        return [e["id"] for e in response.json()["executions"]]

    assert set(await ids()) == {*done, dead}
    assert set(await ids(status="completed")) == set(done)
    assert await ids(status="dead_lettered") == [dead]
    assert await ids(entity_id="POL-9") == [dead]
    assert await ids(workflow="three-steps", entity_id="POL-1") == [done[1]]
    assert await ids(workflow="no-such-workflow") == []
    everything = await ids()
    assert await ids(limit=2) + await ids(limit=2, offset=2) == everything
    page = (await client.get("/executions?limit=1", headers=bearer("reader"))).json()
    assert (page["limit"], page["offset"]) == (1, 0)
    assert page["executions"][0]["progress"]["of"] == 3

    for bad in ("limit=0", "limit=501", "offset=-1", "status=lost", "limit=x"):
        response = await client.get(f"/executions?{bad}", headers=bearer("reader"))
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["extra"], bad

    assert (await client.get("/executions")).status_code == 401
    assert (await client.get("/executions", headers=bearer("publisher"))).status_code == 403
    assert (await client.get("/executions", headers=bearer("operator"))).status_code == 403


async def test_an_execution_shows_step_n_of_m(api: Api, pool: AsyncConnectionPool[Any]) -> None:
    await apply(pool, THREE_STEPS)
    retrying = await seed_execution(
        pool, completed_steps=1, failed_step=(2, "webhook answered 503"), status="retrying"
    )
    completed = await seed_execution(pool, completed_steps=3, status="completed")

    response = await api.client.get(f"/executions/{retrying}", headers=bearer("reader"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == retrying
    assert body["status"] == "retrying"
    assert body["last_error"] == "webhook answered 503"
    assert body["progress"] == {"step": 2, "of": 3, "completed": 1, "text": "step 2 of 3"}
    assert [(s["step"], s["action"], s["status"]) for s in body["steps"]] == [
        (1, "create_task", "completed"),
        (2, "assign", "failed"),
        (3, "create_approval", "pending"),
    ]
    assert body["steps"][1]["error"] == "webhook answered 503"
    # The step-count fields ``govflow executions show --json`` has always had, and what it
    # prints: the same view, the same bytes.
    assert (body["completed_steps"], body["total_steps"]) == (1, 3)
    assert [s["of"] for s in body["steps"]] == [3, 3, 3]
    async with pool.connection() as conn:
        view = await views.read_execution(conn, retrying)
    assert response.content == codec.encode(view)

    body = (await api.client.get(f"/executions/{completed}", headers=bearer("admin"))).json()
    assert body["progress"] == {"step": 3, "of": 3, "completed": 3, "text": "step 3 of 3"}
    assert {s["status"] for s in body["steps"]} == {"completed"}
    assert body["finished_at"]

    for missing in (str(uuid.uuid4()), "not-a-uuid", "%00"):
        response = await api.client.get(f"/executions/{missing}", headers=bearer("reader"))
        assert response.status_code == 404, (missing, response.text)
        assert response.json()["detail"]
    assert (await api.client.get(f"/executions/{completed}")).status_code == 401
    response = await api.client.get(f"/executions/{completed}", headers=bearer("publisher"))
    assert response.status_code == 403


async def test_an_execution_detail_shows_every_step_with_its_timing(
    api: Api, pool: AsyncConnectionPool[Any]
) -> None:
    await apply(pool, THREE_STEPS)
    retrying = await seed_execution(
        pool, completed_steps=1, failed_step=(2, "webhook answered 503"), status="retrying"
    )
    dead = await seed_execution(
        pool, completed_steps=1, failed_step=(2, "webhook answered 404"), status="dead_lettered"
    )

    response = await api.client.get(f"/executions/{retrying}/detail", headers=bearer("reader"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["status"], body["entity_id"]) == (retrying, "retrying", "POL-1")
    assert body["progress"]["text"] == "step 2 of 3"
    steps = [(s["step"], s["action"], s["status"], s["attempts"]) for s in body["steps"]]
    assert steps == [
        (1, "create_task", "completed", 1),
        (2, "assign", "failed", 1),
        (3, "create_approval", "pending", 0),
    ]
    first, second, third = body["steps"]
    assert second["error"] == "webhook answered 503"
    assert second["after_s"] >= first["after_s"] >= 0
    assert (third["updated_at"], third["after_s"]) == (None, None)
    assert {(s["branch_of"], s["branch"], s["wait"]) for s in body["steps"]} == {
        (None, None, False)
    }
    # Seeded without the pipeline: no event kept, no approval or task written.
    assert body["event"] is None
    assert body["event_occurred_at"]
    assert (body["approvals"], body["tasks"]) == ([], [])

    body = (await api.client.get(f"/executions/{dead}/detail", headers=bearer("admin"))).json()
    assert [s["status"] for s in body["steps"]] == ["completed", "failed", "skipped"]

    for missing in (str(uuid.uuid4()), "not-a-uuid"):
        response = await api.client.get(f"/executions/{missing}/detail", headers=bearer("reader"))
        assert response.status_code == 404, (missing, response.text)
        assert response.json()["detail"]
    assert (await api.client.get(f"/executions/{dead}/detail")).status_code == 401
    response = await api.client.get(f"/executions/{dead}/detail", headers=bearer("publisher"))
    assert response.status_code == 403


async def test_token_tells_the_caller_its_actor_and_scopes(api: Api) -> None:
    configured = api.settings.tokens()
    for who, token in TOKENS.items():
        response = await api.client.get("/token", headers=bearer(who))
        assert response.status_code == 200, response.text
        digest = hashlib.sha256(token.encode()).hexdigest()[:8]
        assert response.json() == {"actor": f"api:{digest}", "scopes": sorted(configured[token])}
    admin = (await api.client.get("/token", headers=bearer("admin"))).json()
    assert {"publish", "read", "operate"} <= set(admin["scopes"])
    assert (await api.client.get("/token")).status_code == 401
    response = await api.client.get("/token", headers={"Authorization": "Bearer leaked-guess"})
    assert response.status_code == 401
    assert "leaked-guess" not in response.text


# GET /lag, /stats -----------------------------------------------------------------------------


async def test_lag_is_what_govflow_lag_reports(
    api: Api, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    publisher = Publisher(redis, api.keys)
    for n in range(3):
        await publisher.publish(_event(f"POL-{n}"))
    response = await api.client.get("/lag", headers=bearer("reader"))
    assert response.status_code == 200, response.text
    body = response.json()
    expected = msgspec.to_builtins(await lag.read_lag(redis, pool, api.keys))
    assert set(body) == set(expected)
    for got, want in zip(body["groups"], expected["groups"], strict=True):
        for field in ("stream", "group", "length", "lag", "lag_valid", "pending"):
            assert got[field] == want[field], field
    events = body["groups"][0]
    assert (events["stream"], events["group"], events["lag"]) == (api.keys.events(), "triggers", 3)
    assert events["oldest_undelivered_age_s"] is not None
    assert body["dead_letters"] == 0

    assert (await api.client.get("/lag")).status_code == 401
    assert (await api.client.get("/lag", headers=bearer("operator"))).status_code == 403


async def test_workers_are_listed_by_their_heartbeats(
    api: Api, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(heartbeat_interval=0.5)
    async with running_worker(settings, roles=frozenset({"actions"}), concurrency=1) as worker:
        response = await wait_for(
            lambda: api.client.get("/workers", headers=bearer("reader")),
            lambda r: r.status_code != 200 or any(w["consumers"] for w in r.json()["workers"]),
            within=10,
            what="a heartbeat naming the worker's consumer",
        )
        assert response.status_code == 200, response.text
        (shown,) = response.json()["workers"]
        assert (shown["id"], shown["state"], shown["live"]) == (worker.id, "live", True)
        assert (shown["host"], shown["pid"]) == (socket.gethostname(), os.getpid())
        assert shown["roles"] == ["actions"]
        assert [c["group"] for c in shown["consumers"]] == ["actions"]
    (gone,) = (await api.client.get("/workers", headers=bearer("reader"))).json()["workers"]
    assert (gone["state"], gone["live"]) == ("stopped", False)
    assert gone["stopped_at"] is not None

    assert (await api.client.get("/workers")).status_code == 401
    assert (await api.client.get("/workers", headers=bearer("operator"))).status_code == 403


async def test_stats_count_by_status_and_completions_per_bucket(
    api: Api, pool: AsyncConnectionPool[Any]
) -> None:
    await apply(pool, THREE_STEPS)
    for _ in range(2):
        await seed_execution(pool, completed_steps=3, status="completed")
    await seed_execution(pool, failed_step=(1, "boom"), status="retrying")
    response = await api.client.get("/stats", headers=bearer("reader"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["by_status"] == {"completed": 2, "retrying": 1}
    assert body["bucket_s"] == 10
    assert len(body["throughput"]) == 60
    assert sum(b["completed"] for b in body["throughput"]) == 2
    assert body["dead_letters"] == 0
    assert (await api.client.get("/stats", headers=bearer("publisher"))).status_code == 403


# Dead letters -------------------------------------------------------------------------------


async def test_dead_letters_are_listed_and_replayed_once(
    api: Api, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    payload = {"command": json.dumps({"execution_id": str(uuid.uuid4())})}
    async with pool.connection() as conn:
        await dead_letters.record(
            conn,
            [
                dead_letters.NewDeadLetter(
                    stream=api.keys.commands(),
                    message_id="1-1",
                    payload=payload,
                    error="webhook answered 500 (attempt 1 of 1)",
                    attempts=1,
                    event_type="policy.created",
                )
            ],
        )
        cur = await conn.execute("SELECT id FROM dead_letters")
        ((letter_id,),) = await cur.fetchall()
    assert isinstance(letter_id, int)
    client = api.client

    assert (await client.get("/dead-letters")).status_code == 401
    assert (await client.get("/dead-letters", headers=bearer("reader"))).status_code == 403
    response = await client.get("/dead-letters", headers=bearer("operator"))
    assert response.status_code == 200, response.text
    (listed,) = response.json()["dead_letters"]
    assert (listed["id"], listed["error"]) == (letter_id, "webhook answered 500 (attempt 1 of 1)")

    replay = f"/dead-letters/{letter_id}/replay"
    assert (await client.post(replay)).status_code == 401
    assert (await client.post(replay, headers=bearer("reader"))).status_code == 403
    response = await client.post(replay, content=b"{", headers=bearer("operator"))
    assert response.status_code == 400
    response = await client.post(replay, json={"reason": 5}, headers=bearer("operator"))
    assert response.status_code == 422
    assert response.json()["extra"][0]["key"] == "reason"
    response = await client.post(replay, json={"why": "x"}, headers=bearer("operator"))
    assert response.status_code == 422

    response = await client.post(replay, json={"reason": "hook fixed"}, headers=bearer("operator"))
    assert response.status_code == 202, response.text
    replayed = response.json()
    assert (replayed["id"], replayed["stream"]) == (letter_id, api.keys.commands())
    entries: Any = await redis.xrange(api.keys.commands())
    ((entry_id, fields),) = entries
    assert entry_id.decode() == replayed["entry_id"]
    assert fields[b"replay_of"] == str(letter_id).encode()
    assert fields[b"command"] == payload["command"].encode()
    async with pool.connection() as conn:
        row = await dead_letters.get(conn, letter_id)
    assert row is not None
    assert row.replayed_by == "api:" + hashlib.sha256(TOKENS["operator"].encode()).hexdigest()[:8]
    assert row.replay_reason == "hook fixed"

    # Once only: a second replay is refused, and nothing more is added.
    response = await client.post(replay, headers=bearer("admin"))
    assert response.status_code == 409
    assert "already replayed" in response.json()["detail"]
    assert await redis.xlen(api.keys.commands()) == 1

    listed = (await client.get("/dead-letters", headers=bearer("operator"))).json()
    assert listed == {"dead_letters": []}
    response = await client.get("/dead-letters?include_done=true", headers=bearer("operator"))
    assert [d["id"] for d in response.json()["dead_letters"]] == [letter_id]

    for missing in (letter_id + 1000, 0, 2**70):
        response = await client.post(f"/dead-letters/{missing}/replay", headers=bearer("operator"))
        assert response.status_code == 404, (missing, response.text)


# /metrics, /healthz ---------------------------------------------------------------------------


async def test_metrics_read_the_lag_afresh_on_each_scrape(api: Api, redis: Redis) -> None:
    publisher = Publisher(redis, api.keys)
    series = f'govflow_group_lag{{group="triggers",stream="{api.keys.events()}"}}'

    async def scrape() -> str:
        response = await api.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return response.text

    await publisher.publish_many([_event("POL-1"), _event("POL-2")])
    assert f"{series} 2.0" in (await scrape()).splitlines()
    await publisher.publish(_event("POL-3"))
    text = await scrape()
    assert f"{series} 3.0" in text.splitlines()
    assert "govflow_lag_fresh 1.0" in text.splitlines()
    assert 'govflow_db_pool_max{pool="api"} 8.0' in text.splitlines()
    assert "# TYPE govflow_build_info gauge" in text
    # The workers' counters live in the workers: shown here, they would only ever be 0.
    assert "govflow_entries_total" not in text


async def test_healthz_is_200_when_both_servers_answer(api: Api) -> None:
    response = await api.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "redis": "ok", "postgres": "ok"}


@pytest.mark.parametrize("down", ["postgres", "redis"])
async def test_an_unreachable_server_gives_503_never_500(
    make_settings: Callable[..., Settings], down: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    if down == "postgres":
        settings = make_settings(
            api_tokens=API_TOKENS, database_url=f"postgresql://govflow@127.0.0.1:{port}/govflow"
        )
    else:
        settings = make_settings(api_tokens=API_TOKENS, redis_url=f"redis://127.0.0.1:{port}/0")
    with structlog.testing.capture_logs() as logs:
        async with (
            serving(create_app(settings)) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            response = await client.get("/healthz")
            assert response.status_code == 503
            health = response.json()
            assert health["status"] == "unavailable"
            assert health[down].startswith("unavailable: ")
            assert health["redis" if down == "postgres" else "postgres"] == "ok"

            event = {"type": "policy.created", "tenant": "a", "entity_id": "P"}
            published = await client.post("/events", json=event, headers=bearer("admin"))
            reading = await client.get("/executions", headers=bearer("admin"))
            if down == "postgres":
                assert published.status_code == 202
                assert reading.status_code == 503
                assert reading.json()["detail"] == "Postgres is unavailable"
            else:
                assert published.status_code == 503
                assert published.json()["detail"] == "Redis is unavailable"
                assert reading.status_code == 200
            lagging = await client.get("/lag", headers=bearer("admin"))
            assert lagging.status_code == 503
            workers = await client.get("/workers", headers=bearer("admin"))
            assert workers.status_code == (200 if down == "postgres" else 503)  # Redis only
            scraped = await client.get("/metrics")
            assert scraped.status_code == 200
            assert "govflow_lag_fresh 0.0" in scraped.text.splitlines()
            await client.get("/executions", headers={"Authorization": "Bearer leaked-guess"})
    # No token, configured or guessed, reaches a log line.
    logged = repr(logs) + caplog.text
    for token in [*TOKENS.values(), "leaked-guess"]:
        assert token not in logged


# Without tokens -----------------------------------------------------------------------------


async def test_without_tokens_reads_are_loopback_only_and_writes_are_refused(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(api_tokens=""))
    event = {"type": "policy.created", "tenant": "a", "entity_id": "P"}
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        assert (await client.get("/executions")).status_code == 200
        assert (await client.get("/lag")).status_code == 200
        assert (await client.get("/stats")).status_code == 200
        # Dead letters are read by loopback clients too (the dashboard's panel), never replayed.
        assert (await client.get("/dead-letters")).json() == {"dead_letters": []}
        assert (await client.get("/token")).json() == {"actor": "local", "scopes": ["read"]}
        for response in (
            await client.post("/events", json=event),
            await client.post("/events", json=event, headers=bearer("admin")),
            await client.post("/dead-letters/1/replay"),
            await client.post(f"/executions/{uuid.uuid4()}/cancel"),
            await client.post("/groups/actions/pause"),
        ):
            assert response.status_code == 403
            assert "GOVFLOW_API_TOKENS" in response.json()["detail"]
    # Another host's request never gets past the guard (so no lifespan is needed here).
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://govflow") as remote:
        for path in ("/executions", "/dead-letters"):
            response = await remote.get(path)
            assert response.status_code == 403
            assert "loopback" in response.json()["detail"]
        assert (await remote.get("/token")).json() == {"actor": "anonymous", "scopes": []}


def test_every_configured_token_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    auth = TokenAuth(Settings(api_tokens=API_TOKENS).tokens())
    assert auth._match(TOKENS["publisher"].encode()) == frozenset({"publish"})
    assert len(compared) == len(TOKENS)  # no early exit on the first (matching) token
    compared.clear()
    assert auth._match(b"unknown") is None
    assert len(compared) == len(TOKENS)


# The OpenAPI document, schemathesis -----------------------------------------------------------


async def test_the_openapi_document_validates(api: Api) -> None:
    response = await api.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert set(document["paths"]) == {
        "/events",
        "/executions",
        "/executions/{execution_id}",
        "/executions/{execution_id}/detail",
        "/approvals",
        "/approvals/{approval_id}/decisions",
        "/tasks",
        "/tasks/{task_id}/complete",
        "/entities/{entity_type}/{entity_id}/timeline",
        "/lag",
        "/stats",
        "/workers",
        "/dead-letters",
        "/dead-letters/{dead_letter_id}/replay",
        "/executions/{execution_id}/cancel",
        "/executions/{execution_id}/retry",
        "/groups/{group}/pause",
        "/groups/{group}/resume",
        "/metrics",
        "/healthz",
        "/token",
    }
    body = document["paths"]["/events"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/EventIn"}
    event_in = document["components"]["schemas"]["EventIn"]
    assert set(event_in["required"]) == {"type", "tenant", "entity_id"}
    for path, body_name in (
        ("/approvals/{approval_id}/decisions", "DecisionIn"),
        ("/tasks/{task_id}/complete", "CompletionIn"),
    ):
        body = document["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"]["$ref"].endswith(f"/{body_name}")
    decision_in = document["components"]["schemas"]["DecisionIn"]
    assert decision_in["properties"]["decision"]["enum"] == ["approve", "reject"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert (await api.client.get("/schema/openapi.json")).json() == document


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_schemathesis_finds_no_server_error(
    api: Api, pool: AsyncConnectionPool[Any], redis: Redis, tmp_path: Path
) -> None:
    await apply(pool, THREE_STEPS)
    await seed_execution(pool, completed_steps=1, failed_step=(2, "boom"), status="retrying")
    await seed_approval(pool)
    await seed_task(pool)
    await Publisher(redis, api.keys).publish(_event("POL-1"))
    base = str(api.client.base_url).rstrip("/")
    started = time.monotonic()
    result = await anyio.run_process(
        [
            str(SCHEMATHESIS),
            "run",
            f"{base}/openapi.json",
            "--checks=not_a_server_error",
            "--max-examples=20",
            "--phases=examples,coverage,fuzzing",
            "--seed=20261128",
            "--generation-database=none",
            "--no-color",
            f"--header=Authorization: Bearer {TOKENS['admin']}",
            "--request-timeout=20",
        ],
        cwd=tmp_path,
        check=False,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output[-6000:]
    assert "passed" in output
    assert time.monotonic() - started < 120, "schemathesis ran too long"


# govflow serve ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_govflow_serve_answers_and_stops_on_sigterm(settings: Settings) -> None:
    assert settings.redis_url is not None
    assert settings.database_url is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    env.update(
        GOVFLOW_REDIS_URL=settings.redis_url,
        GOVFLOW_DATABASE_URL=settings.database_url,
        GOVFLOW_PREFIX=settings.prefix,
        GOVFLOW_API_TOKENS=API_TOKENS,
    )
    port = closed_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - a server that runs beside the test
        [str(GOVFLOW), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            async def health() -> int:
                try:
                    return (await client.get("/healthz")).status_code
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    return 0

            await wait_for(health, lambda s: s == 200, within=60, what="govflow serve to answer")
            response = await client.get("/executions", headers=bearer("reader"))
            assert response.status_code == 200
            assert (await client.get("/")).headers["content-security-policy"]

            # A second server on the same port: one line on stderr, exit 2.
            second = await anyio.run_process(
                [str(GOVFLOW), "serve", "--port", str(port)], env=env, check=False
            )
            assert second.returncode == 2
            message = second.stderr.decode()
            assert message.count("\n") == 1
            assert f"cannot listen on 127.0.0.1:{port}" in message
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert f"http://127.0.0.1:{port}/" in stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _event(entity_id: str) -> Event:
    return new_event("policy.created", entity_id, tenant="acme", data={"title": "t"})
