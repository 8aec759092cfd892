"""The HTTP API of human decisions: approvals, decisions, tasks and an entity's timeline.

Each test serves ``create_app`` under uvicorn on a free loopback port and talks to it
with httpx; the approvals and tasks it decides are seeded with the built-in actions'
statements, or made by the real pipeline (an in-process worker) for the full loop.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

import govflow
from govflow.api.app import create_app
from govflow.db import decisions
from govflow.schemas import codec
from govflow.schemas.events import new_event
from govflow.schemas.settings import Settings
from tests.api_helpers import API_TOKENS, bearer, serving
from tests.decision_helpers import PAST, WAITING, seed_approval, seed_task
from tests.pipeline_helpers import apply, publish, running_worker, scalar, wait_for

pytestmark = pytest.mark.anyio


class Api(msgspec.Struct):
    client: httpx.AsyncClient
    settings: Settings


@pytest.fixture
async def api(make_settings: Callable[..., Settings]) -> AsyncIterator[Api]:
    """The API of this test's prefix and database, served on a loopback port."""
    settings = make_settings(api_tokens=API_TOKENS)
    async with (
        serving(create_app(settings)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield Api(client, settings)


async def decide(
    api: Api, approval_id: str, body: Any, who: str = "decider", **kwargs: Any
) -> httpx.Response:
    return await api.client.post(
        f"/approvals/{approval_id}/decisions", json=body, headers=bearer(who), **kwargs
    )


async def complete(api: Api, task_id: str, body: Any, who: str = "decider") -> httpx.Response:
    return await api.client.post(f"/tasks/{task_id}/complete", json=body, headers=bearer(who))


# GET /approvals -------------------------------------------------------------------------------


async def test_approvals_are_listed_with_their_decisions_and_filtered(
    api: Api, pool: AsyncConnectionPool[Any]
) -> None:
    first = await seed_approval(pool, entity_id="POL-1", approvers=("ciso",))
    second = await seed_approval(pool, entity_id="POL-2", approvers=("ciso", "cfo"), required=2)
    assert (await decide(api, first, {"decision": "approve", "by": "ciso"})).status_code == 201

    async def ids(**query: Any) -> list[str]:
        response = await api.client.get("/approvals", params=query, headers=bearer("reader"))
        assert response.status_code == 200, response.text
        return [a["id"] for a in response.json()["approvals"]]

    assert await ids() == [first, second]  # oldest first
    assert await ids(status="approved") == [first]
    assert await ids(status="pending") == [second]
    assert await ids(status="expired") == []
    assert await ids(approver="cfo") == [second]
    assert await ids(approver="ciso", entity_id="POL-1") == [first]
    assert await ids(entity_id="POL-3") == []
    assert await ids(limit=1, offset=1) == [second]

    response = await api.client.get("/approvals", params={"limit": 1}, headers=bearer("reader"))
    page = response.json()
    assert (page["limit"], page["offset"]) == (1, 0)
    async with pool.connection() as conn:
        (expected,) = await decisions.list_approvals(conn, approval_id=first)
    # The CLI's --json prints the same objects (tests/test_approvals_cli.py).
    assert page["approvals"] == [msgspec.json.decode(codec.encode(expected))]
    shown = page["approvals"][0]
    assert (shown["status"], shown["approvers"], shown["required"]) == ("approved", ["ciso"], 1)
    assert (shown["workflow_name"], shown["entity_type"], shown["step"]) == (
        "three-steps",
        "policy",
        3,
    )
    assert [(d["by"], d["decision"], d["comment"]) for d in shown["decisions"]] == [
        ("ciso", "approve", None)
    ]

    bad = await api.client.get("/approvals", params={"status": "maybe"}, headers=bearer("reader"))
    assert bad.status_code == 400
    assert "status" in bad.text


# POST /approvals/{id}/decisions ----------------------------------------------------------------


async def test_a_quorum_decision_answers_201_with_the_approval(
    api: Api, pool: AsyncConnectionPool[Any]
) -> None:
    approval = await seed_approval(pool, approvers=("ciso", "cfo", "cto"), required=2)

    response = await decide(api, approval, {"decision": "approve", "by": "ciso", "comment": "ok"})
    assert response.status_code == 201, response.text
    assert (response.json()["status"], response.json()["decided_at"]) == ("pending", None)

    again = await decide(api, approval, {"decision": "reject", "by": "ciso"})
    assert again.status_code == 409
    assert again.json()["detail"] == f"ciso has already decided on approval {approval}"

    response = await decide(api, approval, {"decision": "approve", "by": "cfo"})
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "approved"
    assert body["decided_at"] is not None
    assert [(d["by"], d["decision"], d["comment"]) for d in body["decisions"]] == [
        ("ciso", "approve", "ok"),
        ("cfo", "approve", None),
    ]

    late = await decide(api, approval, {"decision": "approve", "by": "cto"})
    assert late.status_code == 409
    assert late.json()["detail"] == f"approval {approval} is already approved"


async def test_a_rejection_rejects_at_once(api: Api, pool: AsyncConnectionPool[Any]) -> None:
    approval = await seed_approval(pool, approvers=("ciso", "cfo"), required=2)
    response = await decide(api, approval, {"decision": "reject", "by": "cfo", "comment": "no"})
    assert response.status_code == 201
    assert response.json()["status"] == "rejected"


async def test_decisions_that_cannot_apply_are_refused(
    api: Api, pool: AsyncConnectionPool[Any]
) -> None:
    approval = await seed_approval(pool, approvers=("ciso",))
    overdue = await seed_approval(pool, approvers=("ciso",), due_in=PAST)

    response = await decide(api, approval, {"decision": "approve", "by": "intern"})
    assert response.status_code == 422
    assert response.json()["detail"] == f"'intern' is not an approver of {approval} (ciso)"

    for missing in (str(uuid.uuid4()), "not-a-uuid"):
        response = await decide(api, missing, {"decision": "approve", "by": "ciso"})
        assert response.status_code == 404
        assert response.json()["detail"] == f"no approval {missing}"

    response = await decide(api, overdue, {"decision": "approve", "by": "ciso"})
    assert response.status_code == 409
    assert response.json()["detail"] == f"approval {overdue} expired at its due time"
    # The deadline came first, and stands.
    listed = await api.client.get("/approvals?status=expired", headers=bearer("reader"))
    assert [a["id"] for a in listed.json()["approvals"]] == [overdue]


@pytest.mark.parametrize(
    ("body", "status", "key"),
    [
        (b"not json", 400, None),
        (b"", 400, None),
        ({"by": "ciso"}, 422, "decision"),
        ({"decision": "maybe", "by": "ciso"}, 422, "decision"),
        ({"decision": "approve"}, 422, "by"),
        ({"decision": "approve", "by": ""}, 422, "by"),
        ({"decision": "approve", "by": "a\u0000b"}, 422, "by"),
        ({"decision": "approve", "by": "ciso", "comment": 7}, 422, "comment"),
        ({"decision": "approve", "by": "ciso", "when": "now"}, 422, None),
        ([], 422, None),
    ],
)
async def test_a_malformed_decision_gets_a_4xx_and_decides_nothing(
    api: Api, pool: AsyncConnectionPool[Any], body: Any, status: int, key: str | None
) -> None:
    approval = await seed_approval(pool, approvers=("ciso",))
    if isinstance(body, bytes):
        response = await api.client.post(
            f"/approvals/{approval}/decisions", content=body, headers=bearer("decider")
        )
    else:
        response = await decide(api, approval, body)
    assert response.status_code == status, response.text
    if key is not None:
        assert response.json()["extra"][0]["key"] == key
    assert await scalar(pool, "SELECT count(*) FROM approval_decisions") == 0


async def test_deciding_needs_the_decide_scope(
    api: Api, pool: AsyncConnectionPool[Any], make_settings: Callable[..., Settings]
) -> None:
    approval = await seed_approval(pool, approvers=("ciso",))
    task = await seed_task(pool)
    body = {"decision": "approve", "by": "ciso"}
    for who in ("reader", "operator", "publisher"):
        response = await decide(api, approval, body, who=who)
        assert response.status_code == 403
        assert 'scope="decide"' in response.headers["WWW-Authenticate"]
        assert (await complete(api, task, {"by": "user-17"}, who=who)).status_code == 403
    anonymous = await api.client.post(f"/approvals/{approval}/decisions", json=body)
    assert anonymous.status_code == 401
    # A decide token alone may decide, but not read.
    assert (await api.client.get("/approvals", headers=bearer("decider"))).status_code == 403
    assert await scalar(pool, "SELECT count(*) FROM approval_decisions") == 0

    # Without tokens, a loopback client reads the inbox and decides nothing.
    async with (
        serving(create_app(make_settings(api_tokens=""))) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        assert (await client.get("/approvals")).status_code == 200
        assert (await client.get("/tasks")).status_code == 200
        refused = await client.post(f"/approvals/{approval}/decisions", json=body)
        assert refused.status_code == 403
        assert "GOVFLOW_API_TOKENS" in refused.json()["detail"]
        assert (await client.post(f"/tasks/{task}/complete", json={"by": "x"})).status_code == 403
    assert await scalar(pool, "SELECT count(*) FROM approval_decisions") == 0


# Tasks ----------------------------------------------------------------------------------------


async def test_tasks_are_listed_filtered_and_completed_once(
    api: Api, pool: AsyncConnectionPool[Any]
) -> None:
    mine = await seed_task(pool, assignee="user-17", entity_id="POL-1")
    theirs = await seed_task(pool, assignee="user-42", entity_id="POL-2")
    overdue = await seed_task(pool, assignee="user-42", due_in=PAST)

    async def ids(**query: Any) -> list[str]:
        response = await api.client.get("/tasks", params=query, headers=bearer("reader"))
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["tasks"]]

    assert await ids() == [mine, theirs, overdue]
    assert await ids(assignee="user-42") == [theirs, overdue]
    assert await ids(entity_id="POL-2") == [theirs]

    response = await complete(api, mine, {"by": "user-17"})
    assert response.status_code == 200, response.text
    done = response.json()
    assert (done["id"], done["status"], done["completed_by"]) == (mine, "done", "user-17")
    assert done["completed_at"] is not None
    assert await ids(status="done") == [mine]
    assert await ids(status="open", assignee="user-42") == [theirs, overdue]

    again = await complete(api, mine, {"by": "user-17"})
    assert (again.status_code, again.json()["detail"]) == (409, f"task {mine} is already done")
    late = await complete(api, overdue, {"by": "user-42"})
    assert late.status_code == 409
    assert late.json()["detail"] == f"task {overdue} expired at its due time"
    assert await ids(status="expired") == [overdue]
    for missing in (str(uuid.uuid4()), "nope"):
        response = await complete(api, missing, {"by": "user-42"})
        assert (response.status_code, response.json()["detail"]) == (404, f"no task {missing}")

    for body, status in ((b"{", 400), ({}, 422), ({"by": ""}, 422), ({"by": "x", "y": 1}, 422)):
        if isinstance(body, bytes):
            response = await api.client.post(
                f"/tasks/{theirs}/complete", content=body, headers=bearer("decider")
            )
        else:
            response = await complete(api, theirs, body)
        assert response.status_code == status, response.text
    assert await ids(status="open") == [theirs]
    bad = await api.client.get("/tasks", params={"status": "closed"}, headers=bearer("reader"))
    assert bad.status_code == 400


# The timeline, through the real pipeline ----------------------------------------------------


async def test_the_loop_from_event_to_decision_shows_on_the_entity_timeline(
    api: Api, pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    await apply(pool, WAITING)
    data = {"title": "Access control", "owner": "user-17"}
    first = new_event("policy.created", "POL-7", tenant="acme", data=data, actor="user-17")
    keys = api.settings.keys()
    async with running_worker(api.settings):
        await publish(redis, keys, [first])
        await wait_for(
            lambda: scalar(pool, "SELECT count(*) FROM approvals WHERE status = 'pending'"),
            lambda n: n == 1,
            within=30,
            what="the approval",
        )
        inbox = await api.client.get("/approvals?approver=ciso", headers=bearer("reader"))
        (approval,) = inbox.json()["approvals"]
        response = await decide(api, approval["id"], {"decision": "approve", "by": "ciso"})
        assert response.status_code == 201
        await wait_for(
            lambda: scalar(pool, "SELECT status FROM workflow_executions"),
            lambda s: s == "completed",
            within=30,
            what="the execution resumed and completed",
        )
        # A later event of the same entity comes after everything of the first.
        second = new_event("policy.created", "POL-7", tenant="acme", data=data)
        await publish(redis, keys, [second])
        await wait_for(
            lambda: scalar(pool, "SELECT count(*) FROM approvals WHERE status = 'pending'"),
            lambda n: n == 1,
            within=30,
            what="the second approval",
        )

    response = await api.client.get("/entities/policy/POL-7/timeline", headers=bearer("reader"))
    assert response.status_code == 200, response.text
    timeline = response.json()
    assert (timeline["entity_type"], timeline["entity_id"]) == ("policy", "POL-7")
    items = timeline["items"]
    assert [i["at"] for i in items] == sorted(i["at"] for i in items)
    kinds = [(i["kind"], i.get("step")) for i in items]
    assert kinds == [
        ("event", None),
        ("execution", None),
        ("step", 1),  # create_approval, and the approval it wrote in the same transaction
        ("approval", 1),
        ("decision", None),
        ("step", 2),  # what the decision resumed, in one delivery: create_task, and
        ("step", 3),  # on_approved's assign (numbered after the actions)
        ("task", 2),
        ("event", None),
        ("execution", None),
        ("step", 1),
        ("approval", 1),
    ]
    event, execution = items[0], items[1]
    assert (event["id"], event["type"], event["actor"], event["data"]) == (
        first.id,
        "policy.created",
        "user-17",
        data,
    )
    assert (execution["workflow_name"], execution["event_id"]) == ("policy-approval", first.id)
    assert execution["status"] == "completed"
    decision = next(i for i in items if i["kind"] == "decision")
    assert (decision["by"], decision["decision"], decision["approval_id"]) == (
        "ciso",
        "approve",
        approval["id"],
    )
    steps = {i["step"]: i["action"] for i in items[:8] if i["kind"] == "step"}
    assert steps == {1: "create_approval", 2: "create_task", 3: "assign"}
    assert items[8]["id"] == second.id

    other = await api.client.get(
        "/entities/policy/POL-7/timeline", params={"tenant": "globex"}, headers=bearer("reader")
    )
    assert other.json()["items"] == []
    nobody = await api.client.get("/entities/policy/POL-404/timeline", headers=bearer("reader"))
    assert (nobody.status_code, nobody.json()["items"]) == (200, [])
    unknown = await api.client.get("/entities/contract/C-1/timeline", headers=bearer("reader"))
    assert unknown.status_code == 404
    assert (await api.client.get("/entities/policy/POL-7/timeline")).status_code == 401
    assert (
        await api.client.get("/entities/policy/POL-7/timeline", headers=bearer("decider"))
    ).status_code == 403


# The Python API -------------------------------------------------------------------------------


async def test_the_python_api_is_the_same_operation(
    settings: Settings, pool: AsyncConnectionPool[Any]
) -> None:
    approval = await seed_approval(pool, approvers=("ciso", "cfo"), required=2)
    task = await seed_task(pool)

    async with govflow.Decisions.connect(settings) as gf:
        first = await gf.decide(approval, by="ciso", approve=True, comment="ok")
        assert (first.id, first.status) == (approval, "pending")
        with pytest.raises(govflow.RefusedError) as refused:
            await gf.decide(approval, by="ciso", approve=False)
        assert (refused.value.status, refused.value.reason) == (
            409,
            f"ciso has already decided on approval {approval}",
        )
        with pytest.raises(govflow.RefusedError) as refused:
            await gf.complete_task(str(uuid.uuid4()), by="user-17")
        assert refused.value.status == 404

    # From synchronous code (here in a thread: this test's loop is running).
    decided = await anyio.to_thread.run_sync(
        lambda: govflow.decide(approval, by="cfo", approve=True, settings=settings)
    )
    assert (decided.status, [d.by for d in decided.decisions]) == ("approved", ["ciso", "cfo"])
    done = await anyio.to_thread.run_sync(
        lambda: govflow.complete_task(task, by="user-17", settings=settings)
    )
    assert (done.status, done.completed_by) == ("done", "user-17")


def test_importing_govflow_leaves_the_decisions_until_asked_for() -> None:
    probe = (
        "import sys, govflow; assert 'govflow.operations.decisions' not in sys.modules;"
        " from govflow import Decisions, decide, complete_task;"
        " assert Decisions.__module__ == 'govflow.operations.decisions'"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
