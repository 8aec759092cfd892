"""The HTTP API, ``/metrics`` and the dashboard: a Litestar app served by ``govflow serve``.

``create_app(settings)`` builds the app. Its lifespan opens one Redis client and one
Postgres pool (``api.resources``) and closes them; the pool opens without waiting, so the
API starts (and ``/healthz`` says 503) while Postgres is away, and every other answer that
needs a server that is down is a 503 naming it, never a 500.

This module holds the event, execution, lag, stats and workers routes and the service
routes (metrics, health, token, dashboard, document); approvals, tasks and timelines are
in ``api.decisions``, the ``operate`` routes in ``api.operate``, and what they all share
(limits, filters, documented errors, body decoding) in ``api.conventions``.

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
from typing import Annotated, Any

import anyio
import msgspec
import psycopg
import structlog
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.di import Provide
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
from psycopg_pool import PoolTimeout
from redis import exceptions as redis_errors

from govflow.api import dashboard
from govflow.api.auth import scope_guard
from govflow.api.conventions import (
    AUTH_ERRORS,
    MAX_OFFSET,
    MAX_PAGE,
    SECURITY,
    UNAVAILABLE_ERRORS,
    Filter,
    execution_key,
)
from govflow.api.decisions import (
    complete_task,
    decide_approval,
    entity_timeline,
    list_approvals,
    list_tasks,
)
from govflow.api.errors import error_response, invalid, short
from govflow.api.models import (
    EVENT_IN,
    Accepted,
    Caller,
    CompletionIn,
    DecisionIn,
    EventIn,
    ExecutionPage,
    Health,
    Stats,
    WorkerList,
)
from govflow.api.operate import (
    cancel_execution,
    list_dead_letters,
    pause_group,
    replay_dead_letter,
    resume_group,
    retry_execution,
)
from govflow.api.resources import Deps, Resources
from govflow.core import metrics as process_metrics
from govflow.core import tracing
from govflow.core.pool_metrics import POOLS
from govflow.db import dead_letters, detail, executions, views
from govflow.operations import lag, workers
from govflow.operations.lag_metrics import LagCollector
from govflow.schemas.codec import MAX_ENTRY_BYTES, encode
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.events import convert_event
from govflow.schemas.settings import Settings

log = structlog.get_logger(__name__)

HEALTH_TIMEOUT_S = 2.0
LAG_TIMEOUT_S = 2.0  # /metrics waits this long for fresh lag figures
# Prometheus's text format; Litestar adds "; charset=utf-8".
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4"


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


@post(
    "/events",
    status_code=202,
    opt={"scope": "publish"},
    security=SECURITY,
    responses={
        **AUTH_ERRORS,
        **UNAVAILABLE_ERRORS,
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
    responses={**AUTH_ERRORS, **UNAVAILABLE_ERRORS},
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
        **AUTH_ERRORS,
        **UNAVAILABLE_ERRORS,
        404: ResponseSpec(None, description="No such execution"),
    },
)
async def show_execution(gf: Deps, execution_id: FromPath[str]) -> views.ExecutionView:
    """One execution: step n of m, and the status of each step (as ``executions show --json``)."""
    key = execution_key(execution_id)
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
        **AUTH_ERRORS,
        **UNAVAILABLE_ERRORS,
        404: ResponseSpec(None, description="No such execution"),
    },
)
async def show_execution_detail(gf: Deps, execution_id: FromPath[str]) -> detail.ExecutionDetail:
    """One execution in full: its event, every step with its timing, its approvals and tasks."""
    key = execution_key(execution_id)
    async with gf.pool.connection() as conn:
        found = await detail.read_detail(conn, key)
    if found is None:
        raise NotFoundException(f"no execution {key}")
    return found


# Lag, stats, workers --------------------------------------------------------------------


@get(
    "/lag",
    opt={"scope": "read"},
    security=SECURITY,
    responses={**AUTH_ERRORS, **UNAVAILABLE_ERRORS},
)
async def get_lag(gf: Deps) -> lag.LagReport:
    """Per stream and group: length, lag, pending, oldest ages, consumers; retries, dead letters."""
    return await lag.read_lag(gf.redis, gf.pool, gf.keys, overdue_after_s=gf.overdue_after_s)


@get(
    "/stats",
    opt={"scope": "read"},
    security=SECURITY,
    responses={**AUTH_ERRORS, **UNAVAILABLE_ERRORS},
)
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
    "/workers",
    opt={"scope": "read"},
    security=SECURITY,
    responses={**AUTH_ERRORS, **UNAVAILABLE_ERRORS},
)
async def list_workers(gf: Deps) -> WorkerList:
    """The worker processes by their heartbeats: live, stalled (no progress), stale, stopped."""
    return WorkerList(workers=await workers.read_workers(gf.redis, gf.keys))


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


@get("/token", security=SECURITY, responses={401: AUTH_ERRORS[401]})
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
