"""The HTTP API, ``/metrics`` and the dashboard: a Litestar app served by ``govflow serve``.

``create_app(settings)`` builds the app. Its lifespan opens one Redis client and one
Postgres pool and closes them; the pool opens without waiting, so the API starts (and
``/healthz`` says 503) while Postgres is away, and every other answer that needs a server
that is down is a 503 naming it, never a 500.

Routes and who may call them (see ``govflow/api/auth.py``):

============================================ ========= ==================================
``POST /events``                              publish   202 ``{"id": ...}``
``GET /executions``, ``GET /executions/{id}`` read      filters, paging, step n of m
``GET /executions/{id}/detail``               read      the event, steps, approvals, tasks
``GET /approvals``, ``GET /tasks``            read      filters, paging, with decisions
``POST /approvals/{id}/decisions``            decide    201, or 404 / 409 / 422
``POST /tasks/{id}/complete``                 decide    200, or 404 / 409
``GET /entities/{type}/{id}/timeline``        read      one entity's history, oldest first
``GET /lag``, ``GET /stats``                  read      ``govflow lag --json``; dashboard
``GET /workers``                              read      heartbeats: live, stalled, gone
``GET /dead-letters``                         operate   open letters (loopback: no token)
``POST /dead-letters/{id}/replay``            operate   202, or 404 / 409
``POST /executions/{id}/cancel``              operate   200, or 404 / 409
``POST /executions/{id}/retry``               operate   202, or 404 / 409
``POST /groups/{group}/pause``, ``/resume``   operate   200 with the group's pause
``GET /metrics``, ``GET /healthz``            anyone    Prometheus; Redis and Postgres
``GET /token``                                anyone    the caller's actor and scopes
``GET /``, ``GET /openapi.json``              anyone    the dashboard; this API's document
============================================ ========= ==================================

``/lag`` takes ``read``, not ``operate``: it shows counts and ages, nothing of a payload,
and the dashboard of a read-only token needs it. Dead letters hold payloads, so they take
``operate``; with no tokens configured, loopback clients may read them, as they read
everything else (``api.auth``). Errors are Litestar's JSON shape, ``{"status_code", "detail", "extra"?}``;
an invalid event gets 422 with ``extra: [{"key": <field>, "message": ...}]``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import anyio
import msgspec
import psycopg
import structlog
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    Reference,
    RequestBody,
    SecurityScheme,
)
from litestar.params import FromPath, FromQuery, QueryParameter
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from redis import exceptions as redis_errors

from govflow.api import dashboard
from govflow.api.auth import TokenAuth, principal_of, scope_guard
from govflow.api.errors import error_response, invalid, short
from govflow.api.models import (
    COMPLETION_IN,
    DECISION_IN,
    EVENT_IN,
    REASON_REQUEST,
    Accepted,
    ApprovalPage,
    Caller,
    CompletionIn,
    DeadLetterPage,
    DecisionIn,
    EventIn,
    ExecutionPage,
    Health,
    PauseState,
    Stats,
    TaskPage,
    Timeline,
    WorkerList,
)
from govflow.consumers import pause
from govflow.consumers.streams import RedisClient
from govflow.core import metrics as process_metrics
from govflow.core import tracing
from govflow.core.connect import connect, unprobed
from govflow.core.pool_metrics import POOLS
from govflow.core.unavailable import UNAVAILABLE, is_unavailable
from govflow.db import dead_letters, decisions, detail, executions, timeline, views
from govflow.db.dead_letters import Selection
from govflow.db.interventions import Intervention
from govflow.operations import dlq, interventions, lag, workers
from govflow.operations.decisions import Decisions, RefusedError
from govflow.operations.lag_metrics import LagCollector
from govflow.producers.publish import Publisher
from govflow.schemas.codec import MAX_ENTRY_BYTES, encode
from govflow.schemas.errors import ConfigError, InvalidEntryError
from govflow.schemas.events import ENTITIES, convert_event
from govflow.schemas.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

POOL_TIMEOUT_S = 5.0  # a request waits this long for a Postgres connection, then 503
HEALTH_TIMEOUT_S = 2.0
LAG_TIMEOUT_S = 2.0  # /metrics waits this long for fresh lag figures
MAX_PAGE = 500
MAX_OFFSET = 1_000_000
# Postgres's bigint: a larger dead-letter id exists nowhere, and must not reach a query.
MAX_ID = 2**63 - 1
# Prometheus's text format; Litestar adds "; charset=utf-8".
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4"
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]

# Filters go to text columns: bounded, and without the NUL Postgres text cannot hold.
Filter = Annotated[str | None, QueryParameter(max_length=512, pattern=r"^[^\x00]*$")]


class Resources:
    """What the handlers share: the settings and the connections the lifespan opened."""

    def __init__(self, settings: Settings) -> None:
        if settings.redis_url is None or settings.database_url is None:
            raise ValueError("the API needs a Redis URL and a database URL")
        self.auth = TokenAuth(settings.tokens())
        self.keys = settings.keys()
        self.overdue_after_s = settings.reconcile_after
        self.redis_url = settings.redis_url
        self.database_url = settings.database_url
        self._redis: RedisClient | None = None
        self._pool: AsyncConnectionPool[Any] | None = None
        self._publisher: Publisher | None = None
        self._decisions: Decisions | None = None
        self.last_lag: lag.LagReport | None = None  # served again when a scrape cannot read

    @property
    def redis(self) -> RedisClient:
        """The Redis client (bytes replies)."""
        assert self._redis is not None, "used outside the app's lifespan"
        return self._redis

    @property
    def publisher(self) -> Publisher:
        """The publisher of ``POST /events``: one, so it checks the partitions once."""
        assert self._publisher is not None, "used outside the app's lifespan"
        return self._publisher

    @property
    def decisions(self) -> Decisions:
        """Decide approvals and complete tasks: the operation the CLI calls too."""
        assert self._decisions is not None, "used outside the app's lifespan"
        return self._decisions

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The autocommit Postgres pool."""
        assert self._pool is not None, "used outside the app's lifespan"
        return self._pool

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """Open the client and the pool for the life of the app; close both after."""
        self._redis = await _redis_client(self.redis_url)
        self._publisher = Publisher(self._redis, self.keys)
        self._pool = AsyncConnectionPool(
            self.database_url,
            min_size=1,
            max_size=8,
            open=False,
            timeout=POOL_TIMEOUT_S,
            kwargs={"autocommit": True, "connect_timeout": 5},
        )
        # Without waiting: Postgres may be down; requests that need it get a 503 meanwhile.
        await self._pool.open(wait=False)
        self._decisions = Decisions(self._pool, self._redis, self.keys)
        POOLS.watch("api", self._pool)
        try:
            yield
        finally:
            POOLS.unwatch(self._pool)
            with anyio.CancelScope(shield=True):
                await self._pool.close()
                await self._redis.aclose()


async def _redis_client(url: str) -> RedisClient:
    """The API's client of a Redis server or cluster; a plain one if Redis is away at start.

    Redis being down must not keep the API from starting (its requests answer 503 until
    Redis is back), but then it cannot say whether it is a cluster: the client assumes a
    single server unless the URL says ``?cluster=yes``.
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": 2, "socket_timeout": 10, "health_check_interval": 15,
    }  # fmt: skip
    try:
        return await connect(url, **options)
    except UNAVAILABLE as e:
        if not is_unavailable(e):
            raise
        log.warning("api.redis_unavailable", error=str(e))
        return unprobed(url, **options)


# How handlers ask for the resources (Litestar injects them by this name, `gf`).
Deps = NamedDependency[Resources]


def create_app(settings: Settings) -> Litestar:
    """The API of one deployment (its prefix, servers and tokens)."""
    resources = Resources(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        async with resources.opened():
            yield

    app = Litestar(
        route_handlers=[
            publish_event,
            list_executions,
            show_execution,
            show_execution_detail,
            list_approvals,
            decide_approval,
            list_tasks,
            complete_task,
            entity_timeline,
            get_lag,
            get_stats,
            list_workers,
            list_dead_letters,
            replay_dead_letter,
            cancel_execution,
            retry_execution,
            pause_group,
            resume_group,
            metrics,
            healthz,
            show_token,
            dashboard_page,
            openapi_document,
        ],
        dependencies={"gf": Provide(lambda: resources, sync_to_thread=False)},
        guards=[scope_guard(resources.auth)],
        lifespan=[lifespan],
        exception_handlers={Exception: error_response},
        request_max_body_size=MAX_ENTRY_BYTES,
        openapi_config=OpenAPIConfig(
            title="govflow",
            version="1",
            description="Publish events, follow executions, operate the streams.",
            path="/schema",
            render_plugins=[JsonRenderPlugin()],
            use_handler_docstrings=True,
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
            ),
        ),
        logging_config=None,  # govflow's structlog set-up stays in charge
        debug=False,
    )
    _document_bodies(app)
    return app


# Events ---------------------------------------------------------------------------------

_AUTH_ERRORS = {
    401: ResponseSpec(None, description="No bearer token, or not a configured one"),
    403: ResponseSpec(None, description="The token lacks the scope (or no tokens are set)"),
}
_UNAVAILABLE = {503: ResponseSpec(None, description="Redis or Postgres is unavailable")}


@post(
    "/events",
    status_code=202,
    opt={"scope": "publish"},
    security=SECURITY,
    responses={
        **_AUTH_ERRORS,
        **_UNAVAILABLE,
        400: ResponseSpec(None, description="The body is not JSON"),
        413: ResponseSpec(None, description="The body or the event is over 256 KiB"),
        422: ResponseSpec(None, description="Not a valid event; `extra` names the field"),
    },
)
async def publish_event(request: Request[Any, Any, Any], gf: Deps) -> Accepted:
    """Publish one event to its partition's stream; `id` and `occurred_at` are optional."""
    body = await request.body()
    try:
        given = EVENT_IN.decode(body)
        event = convert_event(
            {
                **msgspec.structs.asdict(given),
                "id": given.id or str(uuid.uuid4()),
                "occurred_at": given.occurred_at or datetime.now(UTC),
            }
        )
    except msgspec.ValidationError as e:
        raise invalid("invalid event", str(e)) from e
    except InvalidEntryError as e:
        raise invalid("invalid event", e.reason.removeprefix("invalid event: ")) from e
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise HTTPException(status_code=400, detail=f"the body is not valid JSON: {e}") from e
    if len(encode(event)) > MAX_ENTRY_BYTES:
        raise HTTPException(
            status_code=413, detail=f"the event is over the {MAX_ENTRY_BYTES} byte limit"
        )
    with tracing.continuing(request.headers):  # a caller's traceparent: its trace goes on
        await gf.publisher.publish(event)
    return Accepted(event.id)


# The bodies the handlers decode themselves, by path and method (see ``_document_bodies``).
_BODIES: list[tuple[str, str, type[msgspec.Struct]]] = [
    ("/events", "post", EventIn),
    ("/approvals/{approval_id}/decisions", "post", DecisionIn),
    ("/tasks/{task_id}/complete", "post", CompletionIn),
]


def _document_bodies(app: Litestar) -> None:
    """Put each request body of ``_BODIES`` into the generated document.

    The handlers decode their bodies themselves (to answer 400, 413 and 422 exactly, and
    never 500), so Litestar cannot see their types; msgspec writes the schemas instead.
    """
    openapi = app.openapi_schema
    schemas, components = msgspec.json.schema_components(
        [body for _, _, body in _BODIES], ref_template="#/components/schemas/{name}"
    )
    assert openapi.components.schemas is not None
    openapi.components.schemas.update(components)  # plain JSON Schema: rendered as it is
    for (path, method, _), schema in zip(_BODIES, schemas, strict=True):
        operation = getattr(openapi.paths[path], method)  # type: ignore[index]
        assert operation is not None
        operation.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=Reference(schema["$ref"]))},
            required=True,
        )


# Executions -----------------------------------------------------------------------------


@get(
    "/executions",
    opt={"scope": "read"},
    security=SECURITY,
    responses={**_AUTH_ERRORS, **_UNAVAILABLE},
)
async def list_executions(
    gf: Deps,
    status: FromQuery[executions.Status | None] = None,
    entity_id: Filter = None,
    workflow: Filter = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET)] = 0,
) -> ExecutionPage:
    """Executions newest first, with their steps; filter by status, entity or workflow."""
    async with gf.pool.connection() as conn:
        found = await executions.list_executions(
            conn, status=status, entity_id=entity_id, workflow=workflow, limit=limit, offset=offset
        )
        page = await views.read_executions(conn, found)
    return ExecutionPage(executions=page, limit=limit, offset=offset)


@get(
    "/executions/{execution_id:str}",
    opt={"scope": "read"},
    security=SECURITY,
    responses={
        **_AUTH_ERRORS,
        **_UNAVAILABLE,
        404: ResponseSpec(None, description="No such execution"),
    },
)
async def show_execution(gf: Deps, execution_id: FromPath[str]) -> views.ExecutionView:
    """One execution: step n of m, and the status of each step (as ``executions show --json``)."""
    key = _execution_key(execution_id)
    async with gf.pool.connection() as conn:
        found = await views.read_execution(conn, key)
    if found is None:
        raise NotFoundException(f"no execution {key}")
    return found


@get(
    "/executions/{execution_id:str}/detail",
    opt={"scope": "read"},
    security=SECURITY,
    responses={
        **_AUTH_ERRORS,
        **_UNAVAILABLE,
        404: ResponseSpec(None, description="No such execution"),
    },
)
async def show_execution_detail(gf: Deps, execution_id: FromPath[str]) -> detail.ExecutionDetail:
    """One execution in full: its event, every step with its timing, its approvals and tasks."""
    key = _execution_key(execution_id)
    async with gf.pool.connection() as conn:
        found = await detail.read_detail(conn, key)
    if found is None:
        raise NotFoundException(f"no execution {key}")
    return found


def _execution_key(execution_id: str) -> str:
    """``execution_id`` as the UUID it must be.

    Raises:
        NotFoundException: not a UUID, so no execution has it.
    """
    try:
        return str(uuid.UUID(execution_id))
    except ValueError as e:
        raise NotFoundException(f"no execution {execution_id!r}: ids are UUIDs") from e


# Approvals, tasks, timelines -----------------------------------------------------------

_REFUSED = {
    404: ResponseSpec(None, description="No such approval or task"),
    409: ResponseSpec(None, description="Decided, done or expired already; or decided by `by`"),
}
_BAD_BODY = {400: ResponseSpec(None, description="The body is not JSON")}


@get(
    "/approvals",
    opt={"scope": "read"},
    security=SECURITY,
    responses={**_AUTH_ERRORS, **_UNAVAILABLE},
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
        **_AUTH_ERRORS,
        **_UNAVAILABLE,
        **_BAD_BODY,
        **_REFUSED,
        422: ResponseSpec(None, description="`by` is not an approver, or the body is invalid"),
    },
)
async def decide_approval(
    request: Request[Any, Any, Any], gf: Deps, approval_id: FromPath[str]
) -> decisions.Approval:
    """Record a decision on an approval; answer the approval as it stands now."""
    given = _decode(await request.body(), DECISION_IN, "invalid decision")
    try:
        return await gf.decisions.decide(
            approval_id, by=given.by, approve=given.decision == "approve", comment=given.comment
        )
    except RefusedError as e:
        raise HTTPException(status_code=e.status, detail=e.reason) from e


@get("/tasks", opt={"scope": "read"}, security=SECURITY, responses={**_AUTH_ERRORS, **_UNAVAILABLE})
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
        **_AUTH_ERRORS,
        **_UNAVAILABLE,
        **_BAD_BODY,
        **_REFUSED,
        422: ResponseSpec(None, description='The body is not {"by": ...}'),
    },
)
async def complete_task(
    request: Request[Any, Any, Any], gf: Deps, task_id: FromPath[str]
) -> decisions.Task:
    """Mark a task done by `by`; answer the task."""
    given = _decode(await request.body(), COMPLETION_IN, "invalid completion")
    try:
        return await gf.decisions.complete_task(task_id, by=given.by)
    except RefusedError as e:
        raise HTTPException(status_code=e.status, detail=e.reason) from e


@get(
    "/entities/{entity_type:str}/{entity_id:str}/timeline",
    opt={"scope": "read"},
    security=SECURITY,
    responses={
        **_AUTH_ERRORS,
        **_UNAVAILABLE,
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


def _decode(body: bytes, decoder: msgspec.json.Decoder[T], what: str) -> T:
    """A request body decoded: 400 when it is not JSON, 422 naming the field that is wrong."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise invalid(what, str(e)) from e
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise HTTPException(status_code=400, detail=f"the body is not valid JSON: {e}") from e


# Lag, stats, dead letters ---------------------------------------------------------------


@get("/lag", opt={"scope": "read"}, security=SECURITY, responses={**_AUTH_ERRORS, **_UNAVAILABLE})
async def get_lag(gf: Deps) -> lag.LagReport:
    """Per stream and group: length, lag, pending, oldest ages, consumers; retries, dead letters."""
    return await lag.read_lag(gf.redis, gf.pool, gf.keys, overdue_after_s=gf.overdue_after_s)


@get("/stats", opt={"scope": "read"}, security=SECURITY, responses={**_AUTH_ERRORS, **_UNAVAILABLE})
async def get_stats(gf: Deps) -> Stats:
    """Executions by status, completions per 10 s over the last 10 minutes, open dead letters."""
    bucket_s = 10
    async with gf.pool.connection() as conn:
        by_status = await executions.count_by_status(conn)
        buckets = await views.throughput(conn, minutes=10, bucket_s=bucket_s)
        open_letters = await dead_letters.count_open(conn)
    return Stats(
        by_status=by_status, bucket_s=bucket_s, throughput=buckets, dead_letters=open_letters
    )


@get(
    "/workers", opt={"scope": "read"}, security=SECURITY, responses={**_AUTH_ERRORS, **_UNAVAILABLE}
)
async def list_workers(gf: Deps) -> WorkerList:
    """The worker processes by their heartbeats: live, stalled (no progress), stale, stopped."""
    return WorkerList(workers=await workers.read_workers(gf.redis, gf.keys))


@get(
    "/dead-letters",
    # Payloads, so `operate` for a token; with no tokens set, loopback clients read them
    # as they read the rest of the dashboard (replaying still takes a token).
    opt={"scope": "operate", "loopback_reads": True},
    security=SECURITY,
    responses={**_AUTH_ERRORS, **_UNAVAILABLE},
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
        **_AUTH_ERRORS,
        **_UNAVAILABLE,
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
    return _decode(body, REASON_REQUEST, "invalid request").reason if body.strip() else None


# Operating executions and groups --------------------------------------------------------

_INTERVENTION_ERRORS = {
    **_AUTH_ERRORS,
    **_UNAVAILABLE,
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
        gf.pool, [_execution_key(execution_id)], actor=principal_of(request).actor, reason=reason
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
        gf.redis, gf.pool, gf.keys, [_execution_key(execution_id)],
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
    **_AUTH_ERRORS,
    **_UNAVAILABLE,
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


# Metrics, health, the dashboard, the document ---------------------------------------------


@get("/metrics", media_type=METRICS_MEDIA_TYPE)
async def metrics(gf: Deps) -> bytes:
    """Prometheus metrics: the deployment's figures, read afresh on each scrape.

    Lag, dead letters, overdue work, the outbox backlog and the workers' states
    (``operations.lag_metrics``), with this process's own: its pool, its version, the
    process. The workers' counters are on their own ``--metrics-port``. A server that is
    down keeps the last figures, after at most ``LAG_TIMEOUT_S``: a scrape must not time
    out because Postgres did.
    """
    fresh = False
    try:
        with anyio.fail_after(LAG_TIMEOUT_S):
            gf.last_lag = await lag.read_lag(
                gf.redis, gf.pool, gf.keys, overdue_after_s=gf.overdue_after_s
            )
        fresh = True
    except Exception as e:  # noqa: BLE001 - a scrape still gets the other metrics
        log.warning("metrics.lag_failed", error=short(e))
    scrape = CollectorRegistry(auto_describe=False)
    for collector in (
        PROCESS_COLLECTOR,
        PLATFORM_COLLECTOR,
        GC_COLLECTOR,
        process_metrics.BUILD_INFO,
        POOLS,
        LagCollector(gf.last_lag, fresh=fresh),
    ):
        scrape.register(collector)
    return generate_latest(scrape)


@get("/healthz", responses={503: ResponseSpec(Health, description="A server is unavailable")})
async def healthz(gf: Deps) -> Response[Health]:
    """200 when Redis answers PING and Postgres SELECT 1; else 503 naming the one that failed."""
    redis_state = postgres_state = "ok"
    try:
        with anyio.fail_after(HEALTH_TIMEOUT_S):
            await gf.redis.ping()
    except (TimeoutError, redis_errors.RedisError, OSError) as e:
        redis_state = f"unavailable: {short(e)}"
    try:
        async with gf.pool.connection(timeout=HEALTH_TIMEOUT_S) as conn:
            await conn.execute("SELECT 1")
    except (PoolTimeout, psycopg.Error, OSError) as e:
        postgres_state = f"unavailable: {short(e)}"
    healthy = redis_state == postgres_state == "ok"
    return Response(
        Health(
            status="ok" if healthy else "unavailable", redis=redis_state, postgres=postgres_state
        ),
        status_code=200 if healthy else 503,
    )


@get("/token", security=SECURITY, responses={401: _AUTH_ERRORS[401]})
async def show_token(request: Request[Any, Any, Any], gf: Deps) -> Caller:
    """The actor and scopes of the presented token: what the dashboard may offer its user."""
    caller = gf.auth.identify(request)
    return Caller(actor=caller.actor, scopes=sorted(caller.scopes))


@get("/", include_in_schema=False, media_type=MediaType.HTML)
async def dashboard_page() -> Response[str]:
    """The dashboard: one page, plain JavaScript; it asks for a token once."""
    return Response(
        dashboard.PAGE,
        media_type=MediaType.HTML,
        headers={
            "Content-Security-Policy": dashboard.CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


@get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """This API's OpenAPI 3.1 document, as Litestar generates it."""
    document: dict[str, Any] = request.app.openapi_schema.to_schema()
    return document
