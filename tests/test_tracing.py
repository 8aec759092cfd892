"""OpenTelemetry: one trace from the publisher through both streams to the webhook.

docs/tracing.md: an event carries its publisher's W3C trace context (``traceparent``);
the trigger matcher's span of the event continues it, each step of the execution
continues the match, a webhook request is a client span whose ``traceparent`` header the
receiver gets, and a ``change_status`` event chained through the outbox continues the
trace of the step that made it. A malformed trace context is ignored, never a reason to
refuse an event. Real Redis, Postgres and HTTP receiver; the SDK's in-memory exporter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis as sync_redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Tracer
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.api.app import create_app
from govflow.core import tracing
from govflow.db.outbox import enqueue
from govflow.schemas.codec import decode_event, encode, json_schemas
from govflow.schemas.commands import RunWorkflow
from govflow.schemas.events import Change, new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.api_helpers import API_TOKENS, bearer, serving
from tests.pipeline_helpers import (
    add_entry,
    apply,
    publish,
    running_worker,
    stream_state,
    wait_for,
    wait_settled,
)
from tests.webhook_server import Reply, WebhookServer, serve

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-for-tests"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

NOTIFY = """
name: traced
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - notify: {webhook: "URL", message: "{data.title} needs review"}
"""
# A draft is moved to "reviewed"; that status change starts the second workflow.
CHAIN = (
    """
name: review-drafts
entity: policy
trigger: status_change
when: [{field: status, equals: draft}]
actions:
  - change_status: {to: reviewed}
""",
    """
name: after-review
entity: policy
trigger: status_change
when: [{field: status, equals: reviewed}]
actions:
  - create_task: {title: "Reviewed {entity_id}"}
""",
)
TASK = """
name: task-per-policy
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {entity_id}"}
"""


class Traces(msgspec.Struct):
    """The spans govflow finished during a test, and a tracer for the test's own."""

    exporter: InMemorySpanExporter
    tracer: Tracer

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        (found,) = self.named(name)
        return found


@pytest.fixture
def traces() -> Iterator[Traces]:
    """govflow's spans go to an in-memory exporter for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield Traces(exporter, provider.get_tracer("tests"))
    finally:
        tracing.use(None)
        provider.shutdown()


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    with serve() as server:
        yield server


def ids(span: ReadableSpan) -> tuple[int, int]:
    """(trace id, span id) of a finished span."""
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def linked(span: ReadableSpan) -> set[int]:
    """The span ids ``span`` links to."""
    return {link.context.span_id for link in span.links}


def sampled(traceparent: str | None) -> str:
    """A sampled ``traceparent`` without its flags (the SDK may set "random" beside "sampled")."""
    assert traceparent is not None
    head, _, flags = traceparent.rpartition("-")
    assert int(flags, 16) & 1, f"{traceparent} is not sampled"
    return head


def header(received: Any, name: str) -> str | None:
    return {k.lower(): v for k, v in received.headers.items()}.get(name.lower())


@pytest.mark.anyio
@pytest.mark.slow
async def test_an_event_is_one_trace_from_its_publisher_to_the_webhook(
    make_settings: Any,
    redis: Redis,
    pool: AsyncConnectionPool[Any],
    webhook: WebhookServer,
    traces: Traces,
) -> None:
    settings = make_settings(webhook_secret=SECRET)
    url = webhook.plan("/traced", Reply(200))
    await apply(pool, NOTIFY.replace("URL", url))
    event = new_event("policy.created", "POL-T1", data={"title": "Access control"})

    async with running_worker(settings):
        with traces.tracer.start_as_current_span("service request") as request:
            await publish(redis, Keys(settings.prefix), [event])
        await wait_settled(pool, 1, within=20)

    trace_id, request_id = request.get_span_context().trace_id, request.get_span_context().span_id
    published = traces.one("publish events")
    match = traces.one("match policy.created")
    task, notify = traces.one("step 1 create_task"), traces.one("step 2 notify")
    post = traces.one("POST")
    for span in (published, match, task, notify, post):
        assert ids(span)[0] == trace_id, span.name
    # Each hop is the child of the one before it.
    assert parent_id(published) == request_id
    assert parent_id(match) == ids(published)[1]
    assert parent_id(task) == parent_id(notify) == ids(match)[1]
    assert parent_id(post) == ids(notify)[1]
    assert (published.kind, match.kind, post.kind) == (
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.CLIENT,
    )
    # The batches are spans of their own, linked from what they did.
    events_batch = [ids(s)[1] for s in traces.named("process events")]
    commands_batch = [ids(s)[1] for s in traces.named("process commands")]
    assert linked(match) & set(events_batch)
    assert linked(task) & set(commands_batch)
    assert dict(notify.attributes or {})["govflow.workflow"] == "traced"
    assert dict(post.attributes or {})["http.response.status_code"] == 200
    # The receiver got the client span's context.
    (sent,) = webhook.requests_to("/traced")
    assert sampled(header(sent, "traceparent")) == f"00-{trace_id:032x}-{ids(post)[1]:016x}"


@pytest.mark.anyio
@pytest.mark.slow
async def test_an_outbox_event_and_the_status_change_it_chains_are_one_trace(
    settings: Settings, pool: AsyncConnectionPool[Any], traces: Traces
) -> None:
    for text in CHAIN:
        await apply(pool, text)
    start = new_event(
        "policy.status_changed",
        "POL-T2",
        data={"status": "draft"},
        changes={"status": Change(from_=None, to="draft")},
    )

    async with running_worker(settings, frozenset({"triggers", "actions", "relay"})):
        # A service commits its change and the event in one transaction, in its own trace.
        with traces.tracer.start_as_current_span("service request") as request:
            async with pool.connection() as conn, conn.transaction():
                await enqueue(conn, start)
        await wait_settled(pool, 2, within=30)

    trace_id = request.get_span_context().trace_id
    outbox = traces.one("publish outbox")
    first, chained = sorted(
        traces.named("match policy.status_changed"), key=lambda s: s.start_time or 0
    )
    change = traces.one("step 1 change_status")
    task = traces.one("step 1 create_task")
    for span in (outbox, first, change, chained, task):
        assert ids(span)[0] == trace_id, span.name
    assert parent_id(outbox) == request.get_span_context().span_id
    assert parent_id(first) == ids(outbox)[1]  # through the outbox and the relay
    assert parent_id(change) == ids(first)[1]
    assert parent_id(chained) == ids(change)[1]  # the chained event continues the step
    assert parent_id(task) == ids(chained)[1]


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_malformed_trace_context_is_ignored_and_the_event_runs(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool[Any], traces: Traces
) -> None:
    await apply(pool, TASK)
    keys = Keys(settings.prefix)
    malformed: list[Any] = [
        "not a traceparent",
        12,
        {"trace": "id"},
        None,
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",  # an all-zero trace id is invalid
        "ff" + TRACEPARENT[2:],  # version ff is invalid
        TRACEPARENT.upper(),
        TRACEPARENT[:-1] + "\x00",  # NUL: Postgres could not store it, so it goes
    ]
    for n, value in enumerate(malformed):
        wire = json.loads(encode(new_event("policy.created", f"POL-M{n}")))
        wire.update(traceparent=value, tracestate="k=v")
        await add_entry(redis, keys.events(), {b"event": json.dumps(wire).encode()})
    # A valid traceparent keeps its trace; only the malformed tracestate beside it goes.
    valid = json.loads(encode(new_event("policy.created", "POL-V")))
    valid.update(traceparent=TRACEPARENT, tracestate=7)
    await add_entry(redis, keys.events(), {b"event": json.dumps(valid).encode()})

    async with running_worker(settings):
        await wait_settled(pool, len(malformed) + 1, within=20)
        await wait_for(
            lambda: stream_state(redis, keys),
            lambda s: s["dead_stream"] == 0 and s["triggers_pending"] == 0,
            within=10,
            what="every event acknowledged, none dead-lettered",
        )

    matches = traces.named("match policy.created")
    batches = {ids(s)[1] for s in traces.named("process events")}
    kept = [s for s in matches if ids(s)[0] == int(TRACEPARENT[3:35], 16)]
    assert len(kept) == 1
    assert parent_id(kept[0]) == int(TRACEPARENT[36:52], 16)
    # The others start in the batch's trace, as if they had carried none.
    others = [s for s in matches if s is not kept[0]]
    assert len(others) == len(malformed)
    assert all(parent_id(s) in batches for s in others)


@pytest.mark.anyio
async def test_the_api_continues_the_trace_of_the_request_that_publishes(
    make_settings: Any, redis: Redis, traces: Traces
) -> None:
    settings = make_settings(api_tokens=API_TOKENS)
    event = {"type": "policy.created", "tenant": "acme", "entity_id": "POL-API"}
    async with (
        serving(create_app(settings)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        for traceparent in (TRACEPARENT, "garbage"):
            headers = {**bearer("publisher"), "traceparent": traceparent}
            response = await client.post("/events", json=event, headers=headers)
            assert response.status_code == 202, response.text

    found: Any = await redis.xrange(Keys(settings.prefix).events())
    (continued, fresh) = [json.loads(fields[b"event"]) for _, fields in found]
    published, _ = sorted(traces.named("publish events"), key=lambda s: s.start_time or 0)
    assert parent_id(published) == int(TRACEPARENT[36:52], 16)
    assert sampled(continued["traceparent"]) == f"00-{TRACEPARENT[3:35]}-{ids(published)[1]:016x}"
    assert TRACEPARENT[3:35] not in fresh["traceparent"]  # a malformed header: a trace of its own


def run_govflow(settings: Settings, *args: str, python: str = "", **env: str) -> Any:
    """Run the command line in a process of its own, as an operator does."""
    assert settings.redis_url is not None
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GOVFLOW_", "OTEL_"))}
    base.update(
        GOVFLOW_REDIS_URL=settings.redis_url,
        GOVFLOW_PREFIX=settings.prefix,
        GOVFLOW_DATA_DIR=settings.data_dir,
    )
    program = ["-c", python + "from govflow.cli import main; main()"]
    return subprocess.run(
        [sys.executable, *program, *args],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def published_event(settings: Settings, event_id: str) -> dict[str, Any]:
    """The wire JSON of the event ``event_id`` as it sits on the stream."""
    assert settings.redis_url is not None
    with sync_redis.Redis.from_url(settings.redis_url) as client:
        for _, fields in client.xrange(Keys(settings.prefix).events()):
            found: dict[str, Any] = json.loads(fields[b"event"])
            if found["id"] == event_id:
                return found
    raise AssertionError(f"event {event_id} is not on the stream")


PUBLISH = ("publish", "policy.created", "--entity-id", "POL-CLI")


@pytest.mark.slow
def test_govflow_publish_exports_its_span_to_the_otlp_endpoint(
    settings: Settings, webhook: WebhookServer
) -> None:
    webhook.plan("/v1/traces", Reply(200))
    result = run_govflow(
        settings,
        *PUBLISH,
        OTEL_EXPORTER_OTLP_ENDPOINT=webhook.url(""),
        OTEL_SERVICE_NAME="policy-service",
    )
    assert result.returncode == 0, result.stderr
    event = published_event(settings, result.stdout.strip())

    exported = ExportTraceServiceRequest()
    (request,) = webhook.requests_to("/v1/traces")
    exported.ParseFromString(request.body)
    (resource_spans,) = exported.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert service["service.name"] == "policy-service"
    (span,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert span.name == "publish events"
    assert sampled(event["traceparent"]) == f"00-{span.trace_id.hex()}-{span.span_id.hex()}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tracing", "endpoint"),
    [("off", True), ("auto", False)],
    ids=["off-with-an-endpoint", "auto-without-one"],
)
def test_without_tracing_nothing_is_exported_nor_carried(
    settings: Settings, webhook: WebhookServer, tracing: str, endpoint: bool
) -> None:
    webhook.plan("/v1/traces", Reply(200))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": webhook.url("")} if endpoint else {}
    result = run_govflow(settings, *PUBLISH, GOVFLOW_TRACING=tracing, **env)
    assert result.returncode == 0, result.stderr
    assert "traceparent" not in published_event(settings, result.stdout.strip())
    assert webhook.requests_to("/v1/traces") == []


# As if the otel extra were not installed: every import of opentelemetry fails.
WITHOUT_OTEL = "import sys; sys.modules['opentelemetry'] = None; "


@pytest.mark.slow
def test_without_the_otel_extra_govflow_publishes_as_before(settings: Settings) -> None:
    result = run_govflow(settings, *PUBLISH, python=WITHOUT_OTEL)
    assert result.returncode == 0, result.stderr
    event = published_event(settings, result.stdout.strip())
    assert "traceparent" not in event
    assert "tracestate" not in event

    refused = run_govflow(settings, *PUBLISH, python=WITHOUT_OTEL, GOVFLOW_TRACING="on")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "govflow: GOVFLOW_TRACING=on needs the otel extra: pip install 'govflow[otel]'"
    ]


class TestTraceFields:
    """The optional wire fields: kept when valid, dropped when not, absent when empty."""

    def test_an_event_without_a_trace_context_encodes_as_before(self) -> None:
        wire = json.loads(encode(new_event("policy.created", "P")))
        assert "traceparent" not in wire
        assert "tracestate" not in wire

    def test_a_valid_trace_context_is_kept(self) -> None:
        wire = json.loads(encode(new_event("policy.created", "P")))
        event = decode_event(json.dumps({**wire, "traceparent": TRACEPARENT, "tracestate": "a=1"}))
        assert (event.traceparent, event.tracestate) == (TRACEPARENT, "a=1")
        assert json.loads(encode(event))["traceparent"] == TRACEPARENT

    @pytest.mark.parametrize(
        ("traceparent", "tracestate", "kept"),
        [
            ("junk", "a=1", (msgspec.UNSET, msgspec.UNSET)),
            (TRACEPARENT + "-00", "a=1", (msgspec.UNSET, msgspec.UNSET)),
            (TRACEPARENT[:-16] + "0" * 16 + TRACEPARENT[-3:], "a=1", (msgspec.UNSET,) * 2),
            (TRACEPARENT, "", (TRACEPARENT, msgspec.UNSET)),
            (TRACEPARENT, "x" * 513, (TRACEPARENT, msgspec.UNSET)),
            (TRACEPARENT, "a=\u00e9", (TRACEPARENT, msgspec.UNSET)),
            (TRACEPARENT, ["a=1"], (TRACEPARENT, msgspec.UNSET)),
        ],
    )
    def test_a_malformed_trace_context_is_dropped(
        self, traceparent: Any, tracestate: Any, kept: tuple[Any, Any]
    ) -> None:
        wire = json.loads(encode(new_event("policy.created", "P")))
        raw = json.dumps({**wire, "traceparent": traceparent, "tracestate": tracestate})
        event = decode_event(raw)
        assert (event.traceparent, event.tracestate) == kept

    def test_a_command_drops_a_malformed_one_too(self) -> None:
        command = msgspec.convert(
            {
                "command": "run",
                "execution_id": "6c1f7d4e-3b0a-4f2e-9a51-0c9e7f3d2b18",
                "workflow_name": "w",
                "workflow_version": 1,
                "event": json.loads(encode(new_event("policy.created", "P"))),
                "traceparent": "00-zz",
            },
            RunWorkflow,
        )
        assert command.traceparent is msgspec.UNSET

    def test_the_schema_shows_both_as_optional_strings(self) -> None:
        defs = json_schemas()["$defs"]
        for name in ("Event", "RunWorkflow"):
            properties = defs[name]["properties"]
            assert properties["traceparent"]["type"] == "string"
            assert properties["tracestate"]["maxLength"] == 512
            assert not {"traceparent", "tracestate"} & set(defs[name].get("required", []))
