"""Whether a workflow definition matches an event."""

from __future__ import annotations

from typing import Any

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


def lookup(data: dict[str, Any], path: str) -> Any:
    """The value at a dotted path, or a sentinel when a part is missing."""
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value
