"""What the HTTP API takes and answers: msgspec Structs, so Litestar encodes them and
documents them in the OpenAPI document as they are."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from govflow.consumers.pause import Pause
from govflow.db import dead_letters, decisions, timeline, views
from govflow.operations.workers import WorkerStatus
from govflow.schemas.events import Change, EventType, NonEmpty


class EventIn(msgspec.Struct, frozen=True, kw_only=True):
    """An event as ``POST /events`` takes it: the wire format, ``id`` and ``occurred_at``
    optional (a new UUID and the time of the request, as ``govflow publish`` fills them)."""

    type: EventType
    tenant: NonEmpty
    entity_id: NonEmpty
    id: NonEmpty | None = None
    occurred_at: datetime | None = None
    actor: str | None = None
    data: dict[str, Any] = {}
    changes: dict[str, Change] = {}
    schema_version: Literal[1] = 1


EVENT_IN = msgspec.json.Decoder(EventIn)


class Accepted(msgspec.Struct, frozen=True):
    """The id of the event accepted for publishing."""

    id: str


class ExecutionPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of executions, newest first."""

    executions: list[views.ExecutionView]
    limit: int
    offset: int


class DeadLetterPage(msgspec.Struct, frozen=True, kw_only=True):
    """Dead letters, newest first."""

    dead_letters: list[dead_letters.DeadLetter]


class WorkerList(msgspec.Struct, frozen=True, kw_only=True):
    """The workers, live first, then gone ones (listed for 15 minutes after their last beat)."""

    workers: list[WorkerStatus]


class ReasonRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Why an operator replays, cancels, retries or pauses; recorded with it."""

    reason: Annotated[str, msgspec.Meta(max_length=1000, pattern=r"^[^\x00]*$")] | None = None


REASON_REQUEST = msgspec.json.Decoder(ReasonRequest)


class PauseState(msgspec.Struct, frozen=True, kw_only=True):
    """A group's pause after ``POST /groups/{group}/pause`` or ``/resume``.

    ``pause`` is the pause in force (``None`` once resumed); ``changed``: whether this
    request paused or resumed it (false: it was so already).
    """

    group: str
    paused: bool
    pause: Pause | None
    changed: bool


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """What the dashboard charts: executions by status, throughput, open dead letters."""

    by_status: dict[str, int]
    bucket_s: int
    throughput: list[views.Bucket]
    dead_letters: int


class Caller(msgspec.Struct, frozen=True, kw_only=True):
    """Who the presented token is recorded as, and the scopes it holds."""

    actor: str
    scopes: list[str]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """Whether the API reaches its servers: ``ok`` or what went wrong, for each."""

    status: Literal["ok", "unavailable"]
    redis: str
    postgres: str


# Human decisions ------------------------------------------------------------------------

# Who decides: recorded in a text column, so bounded and without NUL.
Person = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]


class DecisionIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A decision on an approval, by one of its approvers."""

    decision: Literal["approve", "reject"]
    by: Person
    comment: Annotated[str, msgspec.Meta(max_length=2000, pattern=r"^[^\x00]*$")] | None = None


DECISION_IN = msgspec.json.Decoder(DecisionIn)


class CompletionIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Who completed a task."""

    by: Person


COMPLETION_IN = msgspec.json.Decoder(CompletionIn)


class ApprovalPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of approvals, oldest first, each with its decisions."""

    approvals: list[decisions.Approval]
    limit: int
    offset: int


class TaskPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of tasks, oldest first."""

    tasks: list[decisions.Task]
    limit: int
    offset: int


class Timeline(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that happened to one entity, oldest first; each item says its ``kind``."""

    entity_type: str
    entity_id: str
    items: list[timeline.Item]
