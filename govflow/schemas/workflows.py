"""Workflow definitions: which events start a workflow, and the actions it runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from govflow.schemas.durations import DURATION_JSON_SCHEMA
from govflow.schemas.flow import BRANCHES, StepSpec, flatten

Trigger = Literal["create", "update", "status_change", "delete"]
Entity = Literal["policy", "assessment", "evidence"]
Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.\-]{0,127}$")]

TRIGGER_OF_CHANGE: dict[str, Trigger] = {
    "created": "create",
    "updated": "update",
    "status_changed": "status_change",
    "deleted": "delete",
}


class Condition(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One ``when`` clause: ``field`` with ``equals`` / ``in``, or ``changed``."""

    field: str | None = None
    equals: Any = msgspec.UNSET
    in_: list[Any] | None = msgspec.field(default=None, name="in")
    changed: str | None = None

    def __post_init__(self) -> None:
        if self.changed is not None:
            if self.field is not None:
                raise ValueError("a condition is either `changed` or `field`, not both")
        elif self.field is None:
            raise ValueError("a condition needs `field` (with `equals` or `in`) or `changed`")
        elif (self.equals is msgspec.UNSET) == (self.in_ is None):
            raise ValueError(f"condition on `{self.field}` needs exactly one of `equals`, `in`")


# Keys of a step that govflow reads itself; the rest are the action's parameters.
STEP_OPTIONS = frozenset({"timeout", "wait", *BRANCHES})
# A step's parameters, and the options every step takes (shown in ``govflow schema``).
StepParams = Annotated[
    dict[str, Any],
    msgspec.Meta(
        extra_json_schema={
            "properties": {
                "timeout": {
                    **DURATION_JSON_SCHEMA,
                    "description": "the step's time limit (ms, s, m, h or d; a number is seconds);"
                    " default GOVFLOW_STEP_TIMEOUT",
                },
                "wait": {
                    "type": "boolean",
                    "description": "create_approval and create_task: the execution waits here"
                    " for the decision, then runs the branch for the outcome",
                },
                **{
                    branch: {
                        "type": "array",
                        "items": {"type": "object", "minProperties": 1, "maxProperties": 1},
                        "description": f"the steps run when the outcome is {outcome}",
                    }
                    for branch, outcome in BRANCHES.items()
                },
            }
        }
    ),
]


class Workflow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A workflow definition as written in a YAML or JSON file."""

    name: Name
    entity: Entity
    trigger: Trigger
    when: list[Condition] = []
    actions: Annotated[list[dict[str, StepParams]], msgspec.Meta(min_length=1)]
    enabled: bool = True
    ordering: Literal["entity", "none"] = "none"

    def __post_init__(self) -> None:
        flatten(self.actions)  # raises ValueError with the step at fault

    def specs(self) -> list[StepSpec]:
        """Every step, numbered: the ``actions`` first, then the steps of their branches."""
        return flatten(self.actions)

    def steps(self) -> list[tuple[str, dict[str, Any]]]:
        """Every step as (type, parameters), in number order; step options left out."""
        return [(spec.action, spec.params) for spec in self.specs()]


class StoredWorkflow(msgspec.Struct, frozen=True, kw_only=True):
    """A definition version as kept in the ``workflows`` table."""

    name: str
    version: int
    definition: Workflow
