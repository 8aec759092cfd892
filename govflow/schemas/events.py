"""The domain event: what policy services publish to ``{prefix}:events``."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from govflow.schemas import trace_context
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.trace_context import TraceParent, TraceState

ENTITIES = ("policy", "assessment", "evidence")
EventType = Literal[
    "policy.created",
    "policy.updated",
    "policy.status_changed",
    "policy.deleted",
    "assessment.created",
    "assessment.updated",
    "assessment.status_changed",
    "assessment.deleted",
    "evidence.created",
    "evidence.updated",
    "evidence.status_changed",
    "evidence.deleted",
]
# The columns these go to are Postgres text, which cannot hold NUL: refuse it at the edge,
# or one such event fails the trigger matcher's whole batch again and again.
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=512, pattern=r"^[^\x00]*$")]

# A JSON escape of NUL: ``\u0000`` after an even number of backslashes (an odd number
# makes the first backslash a literal one). A raw NUL byte is not JSON at all.
_NUL_ESCAPE = re.compile(rb"(?:^|[^\\])(?:\\\\)*\\u0000")


class Change(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One field's value before and after the change."""

    from_: Any = msgspec.field(default=None, name="from")
    to: Any = None


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """A change to a policy, an assessment or a piece of evidence.

    ``id`` is the producer's choice and the event's identity: publishing the same id twice
    runs each matched workflow once. ``depth`` counts the ``change_status`` actions that
    led to this event, so that chains of workflows stop. ``traceparent`` and
    ``tracestate`` carry the publisher's trace (``schemas.trace_context``).
    """

    id: NonEmpty
    type: EventType
    tenant: NonEmpty
    entity_id: NonEmpty
    occurred_at: datetime
    actor: str | None = None
    data: dict[str, Any] = {}
    changes: dict[str, Change] = {}
    schema_version: Literal[1] = 1
    depth: Annotated[int, msgspec.Meta(ge=0)] = 0
    causation_id: str | None = None
    root_id: str | None = None  # the event a chain of change_status began with
    # The trace context of the span that published the event; left out when absent.
    traceparent: TraceParent = msgspec.UNSET
    tracestate: TraceState = msgspec.UNSET

    def __post_init__(self) -> None:
        trace_context.keep_valid(self)  # a malformed one is dropped, never refused

    @property
    def root(self) -> str:
        """The id of the event whose chain this event belongs to (its own, for a root)."""
        return self.root_id or self.id

    @property
    def entity(self) -> str:
        """The entity kind: ``policy``, ``assessment`` or ``evidence``."""
        return self.type.partition(".")[0]

    @property
    def change(self) -> str:
        """The change: ``created``, ``updated``, ``status_changed`` or ``deleted``."""
        return self.type.partition(".")[2]


def new_event(
    type: str,
    entity_id: str,
    *,
    tenant: str = "default",
    data: dict[str, Any] | None = None,
    changes: dict[str, Change] | None = None,
    actor: str | None = None,
    id: str | None = None,
    depth: int = 0,
    causation_id: str | None = None,
) -> Event:
    """Build an event with a fresh id and the current time, validated like a decoded one."""
    raw = {
        "id": id or str(uuid.uuid4()),
        "type": type,
        "tenant": tenant,
        "entity_id": entity_id,
        "occurred_at": datetime.now(UTC),
        "actor": actor,
        "data": data or {},
        "changes": changes or {},
        "depth": depth,
        "causation_id": causation_id,
    }
    return convert_event(raw)


def convert_event(raw: dict[str, Any]) -> Event:
    """Validate already-parsed data as an event (the HTTP API, the CLI, the library).

    Raises:
        InvalidEntryError: a missing or mistyped field, an unknown type, a NUL.
    """
    try:
        event = msgspec.convert(raw, Event)
    except msgspec.ValidationError as e:
        raise InvalidEntryError(f"invalid event: {e}") from e
    refuse_nul(msgspec.json.encode(event), "event")
    return event


def refuse_nul(raw: bytes, what: str) -> None:
    """Refuse JSON holding NUL (``\\u0000``) in any string, key or value.

    Postgres text and jsonb cannot store NUL: one such event reaching a batch's
    transaction aborts it, and every other entry of the batch runs again.

    Raises:
        InvalidEntryError: a string holds NUL.
    """
    if b"\\u0000" in raw and _NUL_ESCAPE.search(raw):
        raise InvalidEntryError(
            f"{what} holds a NUL character (\\u0000), which Postgres cannot store"
        )
