"""The shape of a workflow's steps: which wait for a person, and the branches they lead to.

A step of ``create_approval`` or ``create_task`` may say ``wait: true``: the execution
then waits after that step until the approval or task has an outcome, and runs the
branch for it (``on_approved``, ``on_rejected``, ``on_expired``). Every step has a
number, stable for a definition version: the ``actions`` are 1..N in order, and the
steps of their branches follow, N+1 onwards: each action's ``on_approved`` steps, then
``on_rejected``, then ``on_expired`` (not the order the keys are written in, which a
definition stored as jsonb does not keep). The number keys the step's row and its
effect, so a step of a branch runs once like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import msgspec

from govflow.schemas.durations import parse_duration

# A branch's key in a definition, and the outcome that runs it.
BRANCHES: Mapping[str, str] = {
    "on_approved": "approved",
    "on_rejected": "rejected",
    "on_expired": "expired",
}
# The actions a step may wait on, and the outcomes each can end in.
WAITABLE: Mapping[str, frozenset[str]] = {
    "create_approval": frozenset({"approved", "rejected", "expired"}),
    "create_task": frozenset({"done", "expired"}),
}
# Outcomes after which the execution goes on with its remaining steps; after any other
# (rejected, expired) it ends once the branch is done.
GO_ON = frozenset({"approved", "done"})
# Not yet decided: the execution is still waiting.
UNDECIDED = frozenset({"pending", "open"})


class StepSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a definition: its number, action, parameters and options."""

    number: int
    action: str
    params: dict[str, Any]
    timeout: float | None = None
    wait: bool = False
    branches: Mapping[str, tuple[int, ...]] = {}  # outcome -> the numbers of its steps
    branch_of: int | None = None  # the step whose branch this step is in


class Path(msgspec.Struct, frozen=True):
    """Where an execution goes from here: the steps to run, and the step it then waits at."""

    run: tuple[int, ...]
    waits_at: int | None  # None: the execution ends once ``run`` is done


def flatten(actions: list[dict[str, dict[str, Any]]]) -> list[StepSpec]:
    """Number every step of ``actions`` and of their branches; see the module docstring.

    Raises:
        ValueError: a step that is malformed, named as ``action N`` (N its number).
    """
    specs: list[StepSpec] = []
    pending: list[tuple[int, str, list[Any]]] = []  # (owner, branch key, raw steps)
    for raw in actions:
        spec, branches = _spec(raw, len(specs) + 1, in_branch=False)
        specs.append(spec)
        pending.extend((spec.number, key, steps) for key, steps in branches.items())
    owners: dict[int, dict[str, tuple[int, ...]]] = {}
    for owner, key, steps in pending:
        numbers = []
        for raw in steps:
            spec, _ = _spec(raw, len(specs) + 1, in_branch=True, owner=owner)
            specs.append(spec)
            numbers.append(spec.number)
        owners.setdefault(owner, {})[BRANCHES[key]] = tuple(numbers)
    for owner, outcomes in owners.items():
        specs[owner - 1] = msgspec.structs.replace(specs[owner - 1], branches=outcomes)
    return specs


def _spec(
    raw: Any, number: int, *, in_branch: bool, owner: int | None = None
) -> tuple[StepSpec, dict[str, list[Any]]]:
    """One step, and its branches still unnumbered."""
    where = f"action {number}" + (f" (in a branch of action {owner})" if owner else "")
    # TypeError and ValueError alike become the definition's ValidationError (msgspec).
    if not isinstance(raw, dict) or len(raw) != 1:
        raise TypeError(f"{where} must name exactly one action type")
    action, params = next(iter(raw.items()))
    if not isinstance(params, dict):
        raise TypeError(f"{where} ({action}): its parameters must be a mapping")
    timeout = None
    if "timeout" in params:
        try:
            timeout = parse_duration(params["timeout"])
        except ValueError as e:
            raise ValueError(f"{where}: timeout: {e}") from None
    wait = params.get("wait", False)
    if not isinstance(wait, bool):
        raise TypeError(f"{where}: wait must be true or false")
    branches = {key: params[key] for key in BRANCHES if key in params}
    _check_waiting(where, action, params, wait, branches, in_branch)
    # `wait` stays a parameter of the actions that wait: they record it with their row.
    options = {"timeout", *BRANCHES} | ({"wait"} if action not in WAITABLE else set())
    plain = {k: v for k, v in params.items() if k not in options}
    spec = StepSpec(
        number=number, action=action, params=plain, timeout=timeout, wait=wait, branch_of=owner
    )
    return spec, branches


def _check_waiting(
    where: str,
    action: str,
    params: Mapping[str, Any],
    wait: bool,
    branches: Mapping[str, Any],
    in_branch: bool,
) -> None:
    if in_branch and (wait or branches):
        raise ValueError(f"{where}: a branch's steps cannot wait or branch again")
    if wait and action not in WAITABLE:
        raise ValueError(f"{where}: only {' and '.join(sorted(WAITABLE))} can wait, not {action}")
    if branches and not wait:
        raise ValueError(f"{where}: {', '.join(branches)} needs `wait: true`")
    for key, steps in branches.items():
        if BRANCHES[key] not in WAITABLE.get(action, frozenset()):
            raise ValueError(f"{where}: {action} never ends {BRANCHES[key]}, so {key} never runs")
        if not isinstance(steps, list):
            raise TypeError(f"{where}: {key} must be a list of actions")
    if (
        "on_expired" in branches
        and params.get("due_in") is None
        and params.get("due_in_days") is None
    ):
        raise ValueError(f"{where}: on_expired needs a due time (due_in)")


def path(specs: list[StepSpec], done: AbstractSet[int], outcomes: Mapping[int, str]) -> Path:
    """The steps an execution runs next, given the steps done and the waits' outcomes.

    Args:
        specs: the definition's steps (``flatten``).
        done: the numbers of the steps completed.
        outcomes: the status of each waiting step's approval or task, by step number.
    """
    run: list[int] = []
    for spec in (s for s in specs if s.branch_of is None):
        if spec.number in done:
            if not spec.wait:
                continue
        else:
            run.append(spec.number)
            if not spec.wait:
                continue
            return Path(tuple(run), spec.number)
        outcome = outcomes.get(spec.number, "pending")
        if outcome in UNDECIDED:
            return Path(tuple(run), spec.number)
        run.extend(n for n in spec.branches.get(outcome, ()) if n not in done)
        if outcome not in GO_ON:
            return Path(tuple(run), None)
    return Path(tuple(run), None)
