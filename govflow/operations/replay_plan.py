"""The dry run of a replay: what each dead letter would do if it were replayed now.

Definitions may have changed since an entry failed, and steps may have completed since.
An event letter is matched against the enabled definitions as the trigger matcher would
match it: a new execution runs every step, a ``queued`` one has its command emitted
again, any other is left alone. A command letter runs its own workflow version, skipping
the steps its execution already completed (govflow/consumers/actions.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.matching import matches
from govflow.db import decisions, executions, workflows
from govflow.db.dead_letters import DeadLetter
from govflow.schemas import flow
from govflow.schemas.codec import decode_command, decode_event
from govflow.schemas.commands import RunWorkflow, execution_id
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.events import Event
from govflow.schemas.keys import Keys
from govflow.schemas.workflows import StoredWorkflow

Kind = Literal["event", "command", "unknown"]


class StepRef(msgspec.Struct, frozen=True):
    """One step of a workflow: its number and action."""

    step: int
    action: str


class ExecutionPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What a replay would do to one execution."""

    execution_id: str
    workflow: str
    version: int
    status: str | None  # the execution's status now; None: it does not exist yet
    skipped_steps: list[StepRef]  # completed already: a replay skips them
    would_run: list[StepRef]
    note: str


class ReplayPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What replaying one dead letter would do now (definitions may have changed)."""

    id: int
    stream: str
    kind: Kind
    event_id: str | None
    event_type: str | None
    error: str  # why it was dead-lettered
    matches: list[str] | None  # the enabled workflows its event matches now, "name vN";
    # None when the entry holds no event to match
    executions: list[ExecutionPlan]
    outcome: str


async def plan(
    pool: AsyncConnectionPool[Any], keys: Keys, letters: Sequence[DeadLetter]
) -> list[ReplayPlan]:
    """Describe what replaying each letter would do now, without replaying anything."""
    async with pool.connection() as conn:
        planner = _Planner(conn, keys, await workflows.enabled_latest(conn))
        return [await planner.plan(letter) for letter in letters]


class _Planner:
    """Plans letters against one snapshot of the enabled definitions."""

    def __init__(
        self, conn: AsyncConnection[Any], keys: Keys, enabled: list[StoredWorkflow]
    ) -> None:
        self._conn = conn
        self._keys = keys
        self._enabled = enabled
        self._versions: dict[tuple[str, int], StoredWorkflow | None] = {}

    async def plan(self, letter: DeadLetter) -> ReplayPlan:
        kind = _kind(letter, self._keys)
        base: dict[str, Any] = {
            "id": letter.id,
            "stream": letter.stream,
            "kind": kind,
            "event_id": letter.event_id,
            "event_type": letter.event_type,
            "error": letter.error,
        }
        try:
            if kind == "event":
                event = decode_event(_field(letter, "event"))
                plans = [await self._for_event(event, wf) for wf in self._matching(event)]
            elif kind == "command":
                command = decode_command(_field(letter, "command"))
                event = command.event
                plans = [await self._for_command(command)]
            else:
                return ReplayPlan(
                    **base,
                    matches=None,
                    executions=[],
                    outcome="not from an events or commands stream of this deployment:"
                    " it would be added back as it was",
                )
        except InvalidEntryError as e:
            return ReplayPlan(
                **base,
                matches=None,
                executions=[],
                outcome=f"{e.reason}: it would be dead-lettered again",
            )
        base.update(event_id=event.id, event_type=event.type)
        return ReplayPlan(
            **base,
            matches=[f"{wf.name} v{wf.version}" for wf in self._matching(event)],
            executions=plans,
            outcome=_outcome(kind, plans),
        )

    def _matching(self, event: Event) -> list[StoredWorkflow]:
        return [wf for wf in self._enabled if matches(wf.definition, event)]

    async def _for_event(self, event: Event, wf: StoredWorkflow) -> ExecutionPlan:
        """An event replayed: the trigger matcher records new executions, re-emits queued ones."""
        exec_id = execution_id(event.tenant, event.id, wf.name)
        existing = await executions.get_execution(self._conn, exec_id)
        if existing is None:
            return ExecutionPlan(
                execution_id=exec_id,
                workflow=wf.name,
                version=wf.version,
                status=None,
                skipped_steps=[],
                would_run=_first_run(wf),
                note="a new execution: every step runs",
            )
        done, rest = await self._split(existing)
        if existing.status == "queued":
            note, would_run = "queued: its command is emitted again", rest
        else:
            note, would_run = f"already {existing.status}: the trigger matcher leaves it", []
            if existing.status == "dead_lettered":
                note += "; replay its command's dead letter to run it again"
        return ExecutionPlan(
            execution_id=exec_id,
            workflow=existing.workflow_name,
            version=existing.workflow_version,
            status=existing.status,
            skipped_steps=done,
            would_run=would_run,
            note=note,
        )

    async def _for_command(self, command: RunWorkflow) -> ExecutionPlan:
        """A command replayed: the action workers run the steps not yet completed."""
        existing = await executions.get_execution(self._conn, command.execution_id)
        wf = await self._version(command.workflow_name, command.workflow_version)
        plan = ExecutionPlan(
            execution_id=command.execution_id,
            workflow=command.workflow_name,
            version=command.workflow_version,
            status=None if existing is None else existing.status,
            skipped_steps=[],
            would_run=[],
            note="",
        )
        if existing is None:
            return msgspec.structs.replace(
                plan, note="the execution does not exist: it would be dead-lettered again"
            )
        if wf is None:
            return msgspec.structs.replace(
                plan, note="its workflow version is gone: it would be dead-lettered again"
            )
        done, rest = await self._split(existing)
        if existing.status == "completed":
            note, rest = "already completed: acknowledged, nothing runs", []
        elif done:
            note = f"{existing.status}: the completed steps are skipped"
        else:
            note = f"{existing.status}: every step runs"
        return msgspec.structs.replace(plan, skipped_steps=done, would_run=rest, note=note)

    async def _split(self, execution: executions.Execution) -> tuple[list[StepRef], list[StepRef]]:
        """(completed steps, the others) of an execution (with its steps) and its version."""
        completed = {s.step for s in execution.steps if s.status == "completed"}
        wf = await self._version(execution.workflow_name, execution.workflow_version)
        if wf is None:
            return [], []
        specs = wf.definition.specs()
        waits = await decisions.outcomes(self._conn, [execution.id])
        path = flow.path(specs, completed, waits.get(execution.id, {}))
        steps = _steps(wf)
        return [s for s in steps if s.step in completed], [steps[n - 1] for n in path.run]

    async def _version(self, name: str, version: int) -> StoredWorkflow | None:
        key = (name, version)
        if key not in self._versions:
            self._versions[key] = await workflows.get_version(self._conn, name, version)
        return self._versions[key]


def _kind(letter: DeadLetter, keys: Keys) -> Kind:
    """Whether a letter came from an events or a commands stream."""
    for p in keys.all_partitions():
        if letter.stream == keys.events(p):
            return "event"
        if letter.stream == keys.commands(p):
            return "command"
    if "event" in letter.payload:
        return "event"
    if "command" in letter.payload:
        return "command"
    return "unknown"


def _field(letter: DeadLetter, name: str) -> str:
    value = letter.payload.get(name)
    if value is None:
        raise InvalidEntryError(f"entry has no `{name}` field")
    return str(value)


def _first_run(wf: StoredWorkflow) -> list[StepRef]:
    """The steps a new execution runs before it ends or first waits."""
    steps = _steps(wf)
    return [steps[n - 1] for n in flow.path(wf.definition.specs(), set(), {}).run]


def _steps(wf: StoredWorkflow) -> list[StepRef]:
    return [StepRef(n, action) for n, (action, _) in enumerate(wf.definition.steps(), start=1)]


def _outcome(kind: Kind, plans: list[ExecutionPlan]) -> str:
    steps = sum(len(p.would_run) for p in plans)
    running = sum(1 for p in plans if p.would_run)
    if not plans:
        return "matches no enabled workflow now: acknowledged, nothing runs"
    if not steps:  # a command has one execution, whose note says why
        return plans[0].note if kind == "command" else "nothing would run"
    return (
        f"would run {steps} step{'s' * (steps != 1)} in {running} execution{'s' * (running != 1)}"
    )
