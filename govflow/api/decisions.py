"""Approvals, tasks and entity timelines: the routes of the people who decide.

Listing takes ``read``; deciding an approval and completing a task take ``decide`` and go
through ``operations.decisions``, as the CLI does.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, get, post
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, FromQuery, QueryParameter

from govflow.api.conventions import (
    AUTH_ERRORS,
    MAX_OFFSET,
    MAX_PAGE,
    SECURITY,
    UNAVAILABLE_ERRORS,
    Filter,
    decode,
)
from govflow.api.models import (
    COMPLETION_IN,
    DECISION_IN,
    ApprovalPage,
    TaskPage,
    Timeline,
)
from govflow.api.resources import Deps
from govflow.db import decisions, timeline
from govflow.operations.decisions import RefusedError
from govflow.schemas.events import ENTITIES

_REFUSED = {
    404: ResponseSpec(None, description="No such approval or task"),
    409: ResponseSpec(None, description="Decided, done or expired already; or decided by `by`"),
}
_BAD_BODY = {400: ResponseSpec(None, description="The body is not JSON")}


@get(
    "/approvals",
    opt={"scope": "read"},
    security=SECURITY,
    responses={**AUTH_ERRORS, **UNAVAILABLE_ERRORS},
)
async def list_approvals(
    gf: Deps,
    status: FromQuery[decisions.ApprovalStatus | None] = None,
    approver: Filter = None,
    entity_id: Filter = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET)] = 0,
) -> ApprovalPage:
    """Approvals oldest first, with their decisions; filter by status, approver or entity."""
    async with gf.pool.connection() as conn:
        found = await decisions.list_approvals(
            conn, status=status, approver=approver, entity_id=entity_id, limit=limit, offset=offset
        )
    return ApprovalPage(approvals=found, limit=limit, offset=offset)


@post(
    "/approvals/{approval_id:str}/decisions",
    status_code=201,
    opt={"scope": "decide"},
    security=SECURITY,
    responses={
        **AUTH_ERRORS,
        **UNAVAILABLE_ERRORS,
        **_BAD_BODY,
        **_REFUSED,
        422: ResponseSpec(None, description="`by` is not an approver, or the body is invalid"),
    },
)
async def decide_approval(
    request: Request[Any, Any, Any], gf: Deps, approval_id: FromPath[str]
) -> decisions.Approval:
    """Record a decision on an approval; answer the approval as it stands now."""
    given = decode(await request.body(), DECISION_IN, "invalid decision")
    try:
        return await gf.decisions.decide(
            approval_id, by=given.by, approve=given.decision == "approve", comment=given.comment
        )
    except RefusedError as e:
        raise HTTPException(status_code=e.status, detail=e.reason) from e


@get(
    "/tasks",
    opt={"scope": "read"},
    security=SECURITY,
    responses={**AUTH_ERRORS, **UNAVAILABLE_ERRORS},
)
async def list_tasks(
    gf: Deps,
    status: FromQuery[decisions.TaskStatus | None] = None,
    assignee: Filter = None,
    entity_id: Filter = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET)] = 0,
) -> TaskPage:
    """Tasks oldest first; filter by status, assignee or entity."""
    async with gf.pool.connection() as conn:
        found = await decisions.list_tasks(
            conn, status=status, assignee=assignee, entity_id=entity_id, limit=limit, offset=offset
        )
    return TaskPage(tasks=found, limit=limit, offset=offset)


@post(
    "/tasks/{task_id:str}/complete",
    status_code=200,
    opt={"scope": "decide"},
    security=SECURITY,
    responses={
        **AUTH_ERRORS,
        **UNAVAILABLE_ERRORS,
        **_BAD_BODY,
        **_REFUSED,
        422: ResponseSpec(None, description='The body is not {"by": ...}'),
    },
)
async def complete_task(
    request: Request[Any, Any, Any], gf: Deps, task_id: FromPath[str]
) -> decisions.Task:
    """Mark a task done by `by`; answer the task."""
    given = decode(await request.body(), COMPLETION_IN, "invalid completion")
    try:
        return await gf.decisions.complete_task(task_id, by=given.by)
    except RefusedError as e:
        raise HTTPException(status_code=e.status, detail=e.reason) from e


@get(
    "/entities/{entity_type:str}/{entity_id:str}/timeline",
    opt={"scope": "read"},
    security=SECURITY,
    responses={
        **AUTH_ERRORS,
        **UNAVAILABLE_ERRORS,
        404: ResponseSpec(None, description="Not an entity type"),
    },
)
async def entity_timeline(
    gf: Deps,
    entity_type: FromPath[str],
    entity_id: FromPath[str],
    tenant: Filter = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 100,
) -> Timeline:
    """One entity's events, executions, steps, approvals, decisions and tasks, oldest first.

    Each item has a `kind` and the time `at` it happened; `limit` counts the entity's
    executions, the newest, whose items are listed.
    """
    if entity_type not in ENTITIES:
        raise NotFoundException(f"no entity type {entity_type!r}: {', '.join(ENTITIES)}")
    async with gf.pool.connection() as conn:
        items = await timeline.read_timeline(
            conn, entity_type, entity_id, tenant=tenant, limit=limit
        )
    return Timeline(entity_type=entity_type, entity_id=entity_id, items=items)
