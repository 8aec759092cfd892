"""The spans of the consumer groups: each batch, each event matched, each step run.

A batch's span stands for the work on all its entries; each event the trigger matcher
takes gets a span that continues the event's own trace and links to the batch, and
each command emitted carries that span's context. Every step of an execution is a span
in that trace, so an event's trace runs from its publisher to its last webhook
(``core.tracing``, docs/tracing.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from govflow.consumers.outcomes import Outcome
from govflow.core import tracing
from govflow.schemas.commands import RunWorkflow
from govflow.schemas.events import Event
from govflow.schemas.keys import Role

if TYPE_CHECKING:
    from opentelemetry.trace import Span


def batch(role: Role, stream: str, size: int) -> AbstractContextManager[object]:
    """The span of a batch read from ``stream``, current while it is handled."""
    return tracing.span(
        f"process {role}",
        kind="consumer",
        attributes={
            "messaging.system": "redis",
            "messaging.destination.name": stream,
            "messaging.batch.message_count": size,
        },
    )


def step(command: RunWorkflow, number: int, action: str) -> AbstractContextManager[object]:
    """The span of one step, in the trace of its command (else of its event)."""
    if not tracing.on():  # a step is cheap enough that its attributes would show
        return tracing.NO_SPAN
    parent = command if isinstance(command.traceparent, str) else command.event
    return tracing.span(
        f"step {number} {action}",
        parent=parent,
        attributes={
            "govflow.execution.id": command.execution_id,
            "govflow.workflow": command.workflow_name,
            "govflow.workflow.version": command.workflow_version,
            "govflow.step": number,
            "govflow.action": action,
            "govflow.event.id": command.event.id,
            "govflow.tenant": command.event.tenant,
        },
    )


class Matches:
    """The span of each event of a matcher batch, by the event's index in the batch."""

    def __init__(self) -> None:
        self._spans: dict[int, Span] = {}

    def start(self, index: int, event: Event) -> None:
        """Start the span of ``event``: a child of its own trace context, if it has one."""
        if not tracing.on():  # spare every event its attributes
            return
        span = tracing.start_span(
            f"match {event.type}",
            kind="consumer",
            parent=event,
            attributes=tracing.event_attributes([event]),
        )
        if span is not None:
            self._spans[index] = span

    def fields(self, index: int) -> tracing.TraceFields:
        """The trace fields of a command emitted for the event at ``index``."""
        span = self._spans.get(index)
        return tracing.fields(span) if span is not None else {}

    def end(self, outcomes: Sequence[Outcome]) -> None:
        """End every span; a dead-lettered event's is marked failed with the reason."""
        for index, span in self._spans.items():
            if index < len(outcomes) and outcomes[index].kind == "dead":
                tracing.fail(span, outcomes[index].reason)
            span.end()
