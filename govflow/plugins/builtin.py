"""The five actions govflow ships: approvals, tasks, assignments, webhooks, status changes.

They are declared and installed as a plug-in's are: with ``@action`` and an entry point in
govflow's pyproject.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Annotated, Literal

import msgspec

from govflow.core import tracing
from govflow.plugins import Batched, PermanentError, StepContext, action, webhook
from govflow.schemas.codec import encode
from govflow.schemas.durations import parse_duration
from govflow.schemas.events import Change, Event

Text = Annotated[str, msgspec.Meta(min_length=1)]

_IDEMPOTENT = " ON CONFLICT (execution_id, step) DO NOTHING"
APPROVALS = Batched(
    "INSERT INTO approvals (execution_id, step, entity_id, approvers, required, due_at, wait)"
    " SELECT execution_id, step, entity_id, approvers, required, due_at, wait FROM {rows}"
    + _IDEMPOTENT,
    ("execution_id uuid", "step int", "entity_id text", "approvers jsonb", "required int",
     "due_at timestamptz", "wait bool"),
)  # fmt: skip
TASKS = Batched(
    "INSERT INTO tasks (execution_id, step, entity_id, title, assignee, due_at, wait)"
    " SELECT execution_id, step, entity_id, title, assignee, due_at, wait FROM {rows}"
    + _IDEMPOTENT,
    ("execution_id uuid", "step int", "entity_id text", "title text", "assignee text",
     "due_at timestamptz", "wait bool"),
)  # fmt: skip
ASSIGNMENTS = Batched(
    "INSERT INTO assignments (execution_id, step, entity_id, assignee)"
    " SELECT execution_id, step, entity_id, assignee FROM {rows}" + _IDEMPOTENT,
    ("execution_id uuid", "step int", "entity_id text", "assignee text"),
)
NOTIFICATIONS = Batched(
    "INSERT INTO notifications (execution_id, step, webhook, message, idempotency_key, response_status)"
    " SELECT execution_id, step, webhook, message, idempotency_key, response_status FROM {rows}"
    + _IDEMPOTENT,
    (
        "execution_id uuid",
        "step int",
        "webhook text",
        "message text",
        "idempotency_key text",
        "response_status int",
    ),
)
# Queued before STATUS_CHANGES, so the guard sees only the changes an earlier try committed.
CHAINED_EVENTS = Batched(
    "INSERT INTO outbox (event) SELECT r.event FROM {rows} WHERE NOT EXISTS (SELECT 1 FROM"
    " status_changes s WHERE s.execution_id = r.execution_id AND s.step = r.step)",
    ("event jsonb", "execution_id uuid", "step int"),
)
STATUS_CHANGES = Batched(
    "INSERT INTO status_changes (execution_id, step, entity_type, entity_id, from_status, to_status,"
    " event_id) SELECT execution_id, step, entity_type, entity_id, from_status, to_status, event_id"
    " FROM {rows}" + _IDEMPOTENT,
    ("execution_id uuid", "step int", "entity_type text", "entity_id text", "from_status text",
     "to_status text", "event_id text"),
)  # fmt: skip


class Deadline(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A due time, ``due_in`` from when the step runs (``5d``, ``12h``; ``due_in_days``, the
    older spelling, is still read), and whether the execution waits for the outcome."""

    due_in: str | float | None = None
    due_in_days: Annotated[int, msgspec.Meta(ge=0)] | None = None
    wait: bool = False

    def __post_init__(self) -> None:
        if self.due_in is not None and self.due_in_days is not None:
            raise ValueError("write due_in or due_in_days, not both")
        if self.due_in is not None:
            parse_duration(self.due_in)  # raises ValueError naming the value

    def due_at(self, now: datetime) -> datetime | None:
        """When the deadline falls for a step run at ``now``; None without one."""
        if self.due_in is not None:
            return now + timedelta(seconds=parse_duration(self.due_in))
        if self.due_in_days is not None:
            return now + timedelta(days=self.due_in_days)
        return None


class CreateApproval(Deadline, frozen=True, forbid_unknown_fields=True):
    """Ask ``approvers`` to approve the entity: ``required`` of them (a number or ``all``)."""

    approvers: Annotated[list[Text], msgspec.Meta(min_length=1)] = []
    required: Annotated[int, msgspec.Meta(ge=1)] | Literal["all"] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.approvers:
            raise ValueError("approvers: name at least one approver")
        if isinstance(self.required, int) and self.required > len(self.approvers):
            raise ValueError(
                f"required is {self.required}, but only {len(self.approvers)} approver(s) named"
            )

    def approvals_needed(self) -> int:
        return len(self.approvers) if self.required == "all" else self.required


@action("create_approval")
async def create_approval(ctx: StepContext, p: CreateApproval) -> None:
    approvers = [ctx.render(a) for a in p.approvers]
    ctx.effects.add(
        APPROVALS,
        (
            ctx.command.execution_id,
            ctx.step,
            ctx.event.entity_id,
            approvers,
            p.approvals_needed(),
            p.due_at(ctx.now),
            p.wait,
        ),
    )


class CreateTask(Deadline, frozen=True, forbid_unknown_fields=True):
    """Open a task titled ``title`` (a template) for ``assignee``."""

    title: Text = ""
    assignee: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.title:
            raise ValueError("title: give the task a title")


@action("create_task")
async def create_task(ctx: StepContext, p: CreateTask) -> None:
    assignee = ctx.render(p.assignee) if p.assignee else None
    ctx.effects.add(
        TASKS,
        (
            ctx.command.execution_id,
            ctx.step,
            ctx.event.entity_id,
            ctx.render(p.title),
            assignee,
            p.due_at(ctx.now),
            p.wait,
        ),
    )


class Assign(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Assign the entity to ``assignee``."""

    assignee: Text


@action("assign")
async def assign(ctx: StepContext, p: Assign) -> None:
    ctx.effects.add(
        ASSIGNMENTS,
        (ctx.command.execution_id, ctx.step, ctx.event.entity_id, ctx.render(p.assignee)),
    )


class Notify(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST ``message`` to ``webhook``, signed, with an Idempotency-Key."""

    webhook: Text
    message: str = ""


@action("notify", io=True)
async def notify(ctx: StepContext, p: Notify) -> None:
    url, message = ctx.render(p.webhook), ctx.render(p.message)
    body = encode(
        {
            "execution_id": ctx.command.execution_id,
            "workflow": ctx.command.workflow_name,
            "step": ctx.step,
            "event_id": ctx.event.id,
            "event_type": ctx.event.type,
            "tenant": ctx.event.tenant,
            "entity_id": ctx.event.entity_id,
            "message": message,
        }
    )
    async with ctx.hosts.slot(url):
        status = await webhook.deliver(
            ctx.webhooks,
            url,
            body,
            idempotency_key=ctx.idempotency_key,
            keys=ctx.signing_keys,
            allowed=ctx.settings.allowed_hosts(),
        )
    ctx.effects.add(
        NOTIFICATIONS,
        (
            ctx.command.execution_id,
            ctx.step,
            url,
            message,
            ctx.idempotency_key,
            status,
        ),
    )


class ChangeStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Move the entity to status ``to`` and publish the ``status_changed`` event."""

    to: Text


# Chained events get ids derived from the step, so a replayed step publishes the same id.
_CHAIN_NAMESPACE = uuid.UUID("2f7d9a4c-8e51-4b6a-b0c3-5d1e9f8a7b24")


@action("change_status")
async def change_status(ctx: StepContext, p: ChangeStatus) -> None:
    event = ctx.event
    depth = event.depth + 1
    if depth > ctx.settings.max_chain_depth:
        raise PermanentError(
            f"workflow chain deeper than {ctx.settings.max_chain_depth} stopped at event {event.id}"
        )
    before = event.data.get("status")
    to = ctx.render(p.to)
    chained = Event(
        id=str(uuid.uuid5(_CHAIN_NAMESPACE, ctx.idempotency_key)),
        type=f"{event.entity}.status_changed",  # type: ignore[arg-type]  # entity is one of three
        tenant=event.tenant,
        entity_id=event.entity_id,
        occurred_at=ctx.now,
        actor=f"workflow:{ctx.command.workflow_name}",
        data={**event.data, "status": to},
        changes={"status": Change(from_=before, to=to)},
        depth=depth,
        causation_id=event.id,
        root_id=event.root,
        **tracing.fields(),  # this step's span: the chained event continues the trace
    )
    # The chained event leaves through the outbox, committed with the step: published
    # once the transaction commits, never lost to a crash in between.
    ctx.effects.add(
        CHAINED_EVENTS,
        (chained, ctx.command.execution_id, ctx.step),
    )
    ctx.effects.add(
        STATUS_CHANGES,
        (ctx.command.execution_id, ctx.step, event.entity, event.entity_id, before, to, chained.id),
    )
