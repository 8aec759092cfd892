"""The operator's routes: dead letters, cancelling and retrying executions, pausing groups.

All take ``operate``; with no tokens configured, loopback clients may still list dead
letters, as they read the rest of the dashboard. A replay, cancel, retry or pause is
recorded with the caller's actor and the optional ``{"reason": ...}`` of its body.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Request, get, post
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, FromQuery, QueryParameter

from govflow.api.auth import principal_of
from govflow.api.conventions import (
    AUTH_ERRORS,
    MAX_PAGE,
    SECURITY,
    UNAVAILABLE_ERRORS,
    decode,
    execution_key,
)
from govflow.api.models import REASON_REQUEST, DeadLetterPage, PauseState
from govflow.api.resources import Deps
from govflow.consumers import pause
from govflow.db.dead_letters import Selection
from govflow.db.interventions import Intervention
from govflow.operations import dlq, interventions
from govflow.schemas.errors import ConfigError

# Postgres's bigint: a larger dead-letter id exists nowhere, and must not reach a query.
MAX_ID = 2**63 - 1


@get(
    "/dead-letters",
    # Payloads, so `operate` for a token; with no tokens set, loopback clients read them
    # as they read the rest of the dashboard (replaying still takes a token).
    opt={"scope": "operate", "loopback_reads": True},
    security=SECURITY,
    responses={**AUTH_ERRORS, **UNAVAILABLE_ERRORS},
)
async def list_dead_letters(
    gf: Deps,
    include_done: FromQuery[bool] = False,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 100,
) -> DeadLetterPage:
    """Dead letters newest first, with their reasons; open ones unless `include_done`."""
    letters = await dlq.list_letters(gf.pool, include_done=include_done, limit=limit)
    return DeadLetterPage(dead_letters=letters)


@post(
    "/dead-letters/{dead_letter_id:int}/replay",
    status_code=202,
    opt={"scope": "operate"},
    security=SECURITY,
    responses={
        **AUTH_ERRORS,
        **UNAVAILABLE_ERRORS,
        404: ResponseSpec(None, description="No such dead letter"),
        409: ResponseSpec(None, description="Replayed or purged already, or being replayed"),
        422: ResponseSpec(None, description='The body is not {"reason": ...}'),
    },
)
async def replay_dead_letter(
    request: Request[Any, Any, Any], gf: Deps, dead_letter_id: FromPath[int]
) -> dlq.Replayed:
    """Put a dead letter back on its stream, once; optional body `{"reason": ...}`."""
    reason = await _reason(request)
    if not 0 < dead_letter_id <= MAX_ID:
        raise NotFoundException(f"no dead letter {dead_letter_id}")
    report = await dlq.replay(
        gf.redis,
        gf.pool,
        gf.keys,
        Selection(ids=(dead_letter_id,)),
        actor=principal_of(request).actor,
        reason=reason,
    )
    if report.replayed:
        return report.replayed[0]
    why = report.skipped[0].why if report.skipped else "not replayed"
    if why == "no such dead letter":
        raise NotFoundException(f"no dead letter {dead_letter_id}")
    raise HTTPException(status_code=409, detail=f"dead letter {dead_letter_id}: {why}")


async def _reason(request: Request[Any, Any, Any]) -> str | None:
    """The optional ``{"reason": ...}`` of an operator's request."""
    body = await request.body()
    return decode(body, REASON_REQUEST, "invalid request").reason if body.strip() else None


_INTERVENTION_ERRORS = {
    **AUTH_ERRORS,
    **UNAVAILABLE_ERRORS,
    404: ResponseSpec(None, description="No such execution"),
    409: ResponseSpec(None, description="Its status does not allow it; `detail` says why"),
    422: ResponseSpec(None, description='The body is not {"reason": ...}'),
}


@post(
    "/executions/{execution_id:str}/cancel",
    status_code=200,
    opt={"scope": "operate"},
    security=SECURITY,
    responses=_INTERVENTION_ERRORS,
)
async def cancel_execution(
    request: Request[Any, Any, Any], gf: Deps, execution_id: FromPath[str]
) -> Intervention:
    """Cancel an unfinished execution: no step runs after it; optional body `{"reason": ...}`."""
    reason = await _reason(request)
    report = await interventions.cancel(
        gf.pool, [execution_key(execution_id)], actor=principal_of(request).actor, reason=reason
    )
    return _one(report, execution_id)


@post(
    "/executions/{execution_id:str}/retry",
    status_code=202,
    opt={"scope": "operate"},
    security=SECURITY,
    responses=_INTERVENTION_ERRORS,
)
async def retry_execution(
    request: Request[Any, Any, Any], gf: Deps, execution_id: FromPath[str]
) -> Intervention:
    """Run a dead-lettered or cancelled execution again from the step it stopped at, once."""
    reason = await _reason(request)
    report = await interventions.retry(
        gf.redis, gf.pool, gf.keys, [execution_key(execution_id)],
        actor=principal_of(request).actor, reason=reason,
    )  # fmt: skip
    return _one(report, execution_id)


def _one(report: interventions.InterventionReport, execution_id: str) -> Intervention:
    """The intervention a request made, or the 404 or 409 that says why there is none."""
    if report.done:
        return report.done[0]
    why = report.refused[0].why
    if why == interventions.NO_SUCH:
        raise NotFoundException(f"no execution {execution_id}")
    raise HTTPException(status_code=409, detail=f"execution {execution_id}: {why}")


_GROUP_ERRORS = {
    **AUTH_ERRORS,
    **UNAVAILABLE_ERRORS,
    404: ResponseSpec(None, description="No such group: `triggers` or `actions`"),
}


@post(
    "/groups/{group:str}/pause",
    status_code=200,
    opt={"scope": "operate"},
    security=SECURITY,
    responses={**_GROUP_ERRORS, 422: ResponseSpec(None, description='Not {"reason": ...}')},
)
async def pause_group(
    request: Request[Any, Any, Any], gf: Deps, group: FromPath[str]
) -> PauseState:
    """Stop the group's consumers taking entries (the batches in hand finish); optional reason."""
    reason = await _reason(request)
    wanted = pause.Pause(
        group=_group(group),
        by=principal_of(request).actor,
        since=datetime.now(UTC),
        reason=reason,
    )
    current, changed = await pause.pause(gf.redis, gf.keys, wanted)
    return PauseState(group=group, paused=True, pause=current, changed=changed)


@post(
    "/groups/{group:str}/resume",
    status_code=200,
    opt={"scope": "operate"},
    security=SECURITY,
    responses=_GROUP_ERRORS,
)
async def resume_group(gf: Deps, group: FromPath[str]) -> PauseState:
    """Let the group's consumers take entries again."""
    lifted = await pause.resume(gf.redis, gf.keys, _group(group))
    return PauseState(group=group, paused=False, pause=None, changed=lifted is not None)


def _group(group: str) -> str:
    try:
        return pause.check_group(group)
    except ConfigError as e:
        raise NotFoundException(str(e)) from e
