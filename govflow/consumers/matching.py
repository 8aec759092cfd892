"""Whether a workflow definition matches an event."""

from __future__ import annotations

from typing import Any

import msgspec

from govflow.schemas.events import Event
from govflow.schemas.workflows import TRIGGER_OF_CHANGE, Condition, Workflow

MISSING = object()


def matches(workflow: Workflow, event: Event) -> bool:
    """True when the event is of the workflow's entity and trigger, and every condition holds."""
    return (
        workflow.entity == event.entity
        and workflow.trigger == TRIGGER_OF_CHANGE.get(event.change)
        and all(holds(condition, event) for condition in workflow.when)
    )


def holds(condition: Condition, event: Event) -> bool:
    """Whether one ``when`` clause holds for the event."""
    if condition.changed is not None:
        return condition.changed in event.changes
    value = lookup(event.data, condition.field or "")
    if value is MISSING:
        return False
    if condition.in_ is not None:
        return value in condition.in_
    return bool(value == condition.equals)


class Miss(msgspec.Struct, frozen=True):
    """Why a workflow did not match an event, and how near it came."""

    nearness: int  # 0: another entity; 1: another trigger; 2 + the conditions that held
    reason: str


def explain(workflow: Workflow, event: Event) -> Miss | None:
    """``None`` when the workflow matches the event; else the first thing that did not."""
    if workflow.entity != event.entity:
        return Miss(0, f"it is for {workflow.entity} events, not {event.entity}")
    trigger = TRIGGER_OF_CHANGE.get(event.change)
    if workflow.trigger != trigger:
        return Miss(1, f"its trigger is {workflow.trigger}, and the event is a {trigger}")
    failed = [c for c in workflow.when if not holds(c, event)]
    if not failed:
        return None
    clause, found = describe(failed[0], event)
    more = f"; nor did {len(failed) - 1} more" if len(failed) > 1 else ""
    return Miss(
        2 + len(workflow.when) - len(failed),
        f"trigger {workflow.trigger} matched, but `{clause}` did not hold ({found}){more}",
    )


def describe(condition: Condition, event: Event) -> tuple[str, str]:
    """A ``when`` clause as written, and what the event held instead."""
    if condition.changed is not None:
        changed = ", ".join(event.changes)
        return f"changed: {condition.changed}", (
            f"the event changed {changed}" if changed else "the event changed nothing"
        )
    field = condition.field or ""
    clause = (
        f"{field} in {_short(condition.in_)}"
        if condition.in_ is not None
        else f"{field} equals {_short(condition.equals)}"
    )
    value = lookup(event.data, field)
    return clause, f"data has no {field}" if value is MISSING else f"it is {_short(value)}"


def _short(value: Any, limit: int = 40) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def lookup(data: dict[str, Any], path: str) -> Any:
    """The value at a dotted path, or a sentinel when a part is missing."""
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value
