"""OpenTelemetry spans and the W3C trace context, when the ``otel`` extra is installed.

A trace follows an event from its publisher through both streams to the webhook
(docs/tracing.md): the publisher's span goes with the event (its ``traceparent`` field),
the trigger matcher's span of that event goes with each command it emits, every step of
the execution continues that, and a webhook request sends its own span on in a
``traceparent`` header.

Without the extra, with ``GOVFLOW_TRACING=off``, or in a govflow process with nowhere to
send spans (``configure``), every function here returns at once: ``span()`` hands back one
shared ``nullcontext`` and ``fields()`` an empty dict.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

import msgspec

from govflow.schemas.errors import ConfigError
from govflow.schemas.events import Event

try:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the otel extra is not installed: no spans, at no cost
    INSTALLED = False
else:
    INSTALLED = True

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider
    from opentelemetry.util.types import Attributes

Kind = Literal["producer", "consumer", "client", "internal"]
Mode = Literal["auto", "on", "off"]
TRACER_NAME = "govflow"
DEFAULT_SERVICE_NAME = "govflow"
# Any of these names an OTLP collector: with GOVFLOW_TRACING=auto, spans are exported.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class TraceFields(TypedDict, total=False):
    """A span's context as an event's or a command's fields (``schemas.trace_context``)."""

    traceparent: str
    tracestate: str


class Traced(Protocol):
    """An entry that may carry a trace context: an ``Event``, a ``RunWorkflow``."""

    @property
    def traceparent(self) -> Any: ...

    @property
    def tracestate(self) -> Any: ...


# What ``span`` gives when govflow makes no spans.
NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()
_on = INSTALLED
if INSTALLED:
    _W3C = TraceContextTextMapPropagator()
    _KINDS = {
        "producer": trace.SpanKind.PRODUCER,
        "consumer": trace.SpanKind.CONSUMER,
        "client": trace.SpanKind.CLIENT,
        "internal": trace.SpanKind.INTERNAL,
    }
    # Follows the global provider, even one set after this import.
    _tracer: Tracer = trace.get_tracer(TRACER_NAME)


def use(provider: TracerProvider | None) -> None:
    """Make govflow's spans with ``provider`` from now on, whatever ``configure`` decided;
    ``None``: with the global provider, as a library does by default."""
    global _tracer, _on
    _tracer = trace.get_tracer(TRACER_NAME, tracer_provider=provider)
    _on = True


def on() -> bool:
    """Whether govflow makes spans: a caller skips building a span's attributes if not."""
    return _on


def span(
    name: str,
    *,
    kind: Kind = "internal",
    parent: Traced | None = None,
    attributes: Attributes = None,
) -> AbstractContextManager[Span | None]:
    """A span, current within the block; an exception leaving it marks it failed.

    With a ``parent`` that carries a valid trace context, the span continues that trace
    and links to the current span (the batch it is part of); otherwise it is a child of
    the current span.
    """
    if not _on:
        return NO_SPAN
    context, links = _parent(parent)
    return _tracer.start_as_current_span(
        name, context=context, kind=_KINDS[kind], attributes=attributes, links=links
    )


def start_span(
    name: str,
    *,
    kind: Kind = "internal",
    parent: Traced | None = None,
    attributes: Attributes = None,
) -> Span | None:
    """A span like ``span()``'s that is not made current; the caller ends it."""
    if not _on:
        return None
    context, links = _parent(parent)
    return _tracer.start_span(
        name, context=context, kind=_KINDS[kind], attributes=attributes, links=links
    )


def fields(of: Span | None = None) -> TraceFields:
    """The context of span ``of`` (else of the current span) as trace fields; ``{}`` if none."""
    if not _on:
        return {}
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(of) if of is not None else None)
    found = TraceFields()
    if traceparent := carrier.get("traceparent"):
        found["traceparent"] = traceparent
        if tracestate := carrier.get("tracestate"):
            found["tracestate"] = tracestate
    return found


def stamped(events: list[Event]) -> list[Event]:
    """``events``, those without a trace context given the current span's."""
    found = fields()
    if not found:
        return events
    return [
        e if isinstance(e.traceparent, str) else msgspec.structs.replace(e, **found) for e in events
    ]


def with_context(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` and the current span's ``traceparent`` (and ``tracestate``)."""
    if not _on:
        return headers
    carrier = dict(headers)
    _W3C.inject(carrier)
    return carrier


@contextlib.contextmanager
def continuing(headers: Mapping[str, str]) -> Iterator[None]:
    """Make the trace context of ``headers`` (an HTTP request's) current within the block."""
    if not _on or "traceparent" not in headers:
        yield
        return
    context = _W3C.extract(headers)
    with trace.use_span(trace.get_current_span(context), end_on_exit=False):
        yield


def fail(span: Span, reason: str) -> None:
    """Mark ``span`` failed with ``reason``."""
    span.set_status(trace.StatusCode.ERROR, reason)


def event_attributes(events: Sequence[Event]) -> dict[str, Any]:
    """What a span says of the events it handles: their count, and one event's identity."""
    if len(events) != 1:
        return {"messaging.system": "redis", "messaging.batch.message_count": len(events)}
    (event,) = events
    return {
        "messaging.system": "redis",
        "govflow.event.id": event.id,
        "govflow.event.type": event.type,
        "govflow.tenant": event.tenant,
        "govflow.entity_id": event.entity_id,
    }


def _parent(parent: Traced | None) -> tuple[Context | None, list[trace.Link]]:
    """The context a new span starts in, and its links, for an entry's trace context."""
    context = _context_of(parent) if parent is not None else None
    if context is None:
        return None, []  # a child of the current span
    current = trace.get_current_span().get_span_context()
    return context, [trace.Link(current)] if current.is_valid else []


def _context_of(entry: Traced) -> Context | None:
    """The context an entry's ``traceparent`` names; ``None`` when it names none."""
    if not isinstance(entry.traceparent, str):
        return None
    carrier = {"traceparent": entry.traceparent}
    if isinstance(entry.tracestate, str):
        carrier["tracestate"] = entry.tracestate
    context = _W3C.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def configure(mode: Mode, env: Mapping[str, str]) -> None:
    """Set a govflow process up to export its spans, from ``GOVFLOW_TRACING`` and ``OTEL_*``.

    ``on``: spans go over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (else
    ``localhost:4318``). ``auto``: the same when the extra is installed and an OTLP
    endpoint is set. A provider set already (by ``opentelemetry-instrument``, say) is kept
    and used. With no provider at all, or ``off``, no spans are made and no context is
    passed on: the API's no-op spans would cost tens of microseconds a step for nothing.

    Raises:
        ConfigError: ``on`` without the ``otel`` extra.
    """
    global _on
    if mode == "on" and not _exporter_installed():
        raise ConfigError("GOVFLOW_TRACING=on needs the otel extra: pip install 'govflow[otel]'")
    wanted = mode == "on" or (mode == "auto" and any(env.get(n) for n in ENDPOINT_VARIABLES))
    if wanted and _exporter_installed() and _no_provider_yet():
        _export_over_otlp()
    _on = mode != "off" and INSTALLED and not _no_provider_yet()


def _exporter_installed() -> bool:
    """Whether the SDK and the OTLP exporter (the ``otel`` extra) are installed."""
    try:
        found = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http")
    except ModuleNotFoundError:  # not even its parent package
        return False
    return (
        INSTALLED
        and found is not None
        and importlib.util.find_spec("opentelemetry.sdk") is not None
    )


def _no_provider_yet() -> bool:
    return isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _export_over_otlp() -> None:
    """Install the SDK's provider, exporting in batches over OTLP/HTTP; flushed at exit."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
