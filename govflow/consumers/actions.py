"""The action workers (group ``actions``): run each execution's steps, once each.

A batch of commands runs in one Postgres transaction: every step's effect rows and its
``execution_steps`` row are written together with one ``executemany`` per statement, and
the entries are acknowledged only after the commit. A redelivered command finds its
completed steps and skips them, so no effect happens twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.definitions import Definitions
from govflow.consumers.outcomes import ACK, EntryIds, Outcome, RetryPolicy, dead
from govflow.consumers.streams import REPLAY_FIELD, Entry, command_of
from govflow.core import metrics
from govflow.core.unavailable import UNAVAILABLE
from govflow.db import executions
from govflow.plugins import Effects, StepContext
from govflow.plugins.registry import registry
from govflow.schemas.commands import RunWorkflow
from govflow.schemas.errors import InvalidEntryError, PermanentError
from govflow.schemas.keys import Role
from govflow.schemas.settings import Settings

log = structlog.get_logger(__name__)


class Work(msgspec.Struct):
    """A command to run, where its outcome goes, and the steps already done."""

    index: int
    entry: Entry
    command: RunWorkflow
    done: frozenset[int] = frozenset()


class Failure(msgspec.Struct, frozen=True):
    """A step that failed, and the status its execution moves to."""

    execution_id: str
    step: int
    action: str
    status: executions.Status
    error: str


class ActionRunner:
    """The handler of the ``actions`` group."""

    role: Role = "commands"

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        definitions: Definitions,
        policy: RetryPolicy,
        settings: Settings,
        http: httpx.AsyncClient,
    ) -> None:
        self._pool = pool
        self._definitions = definitions
        self._policy = policy
        self._settings = settings
        self._http = http
        # Loaded here, so that a plug-in that fails to load stops the worker at start.
        self._actions = registry()

    async def handle(self, batch: Sequence[Entry]) -> list[Outcome]:
        """Run a batch of commands; return each entry's outcome."""
        outcomes: list[Outcome] = [ACK] * len(batch)
        work: list[Work] = []
        taken: set[str] = set()
        for index, entry in enumerate(batch):
            try:
                command = command_of(entry)
            except InvalidEntryError as e:
                outcomes[index] = dead(e.reason, "invalid_entry")
                continue
            if command.execution_id in taken:
                # A second command for an execution this batch runs already (the matcher
                # emits one again for a row still queued): running both would do each step
                # twice, and their step rows would collide in one statement.
                outcomes[index] = Outcome(kind="ack", **_ids(command))
                continue
            taken.add(command.execution_id)
            work.append(Work(index, entry, command))
        if not work:
            return outcomes
        async with self._pool.connection() as conn:
            work = await self._start(conn, work, outcomes)
            try:
                async with conn.transaction():
                    await self._run(conn, work, outcomes)
            except UNAVAILABLE:
                raise
            except psycopg.Error:
                # One command's SQL failed and aborted the batch's transaction: run each
                # alone, so that only the bad one fails.
                log.warning("batch.split", size=len(work), exc_info=True)
                for item in work:
                    await self._run_alone(conn, item, outcomes)
        return outcomes

    async def _start(
        self, conn: AsyncConnection[Any], work: list[Work], outcomes: list[Outcome]
    ) -> list[Work]:
        """Skip finished executions, show the rest running; return what is left to run."""
        async with conn.transaction():
            states = await executions.states(conn, [w.command.execution_id for w in work])
            runnable = []
            for w in work:
                ids = _ids(w.command)
                state = states.get(w.command.execution_id)
                if state is None:
                    outcomes[w.index] = dead(
                        "the execution row does not exist", "invalid_entry", **ids
                    )
                elif state.status == "completed":
                    outcomes[w.index] = Outcome(kind="ack", **ids)  # a duplicate: done already
                elif state.status == "dead_lettered" and w.entry.field(REPLAY_FIELD) is None:
                    # Dead-lettered by an earlier delivery that died before handing over.
                    outcomes[w.index] = dead(
                        state.last_error or "dead-lettered", "permanent_error", **ids
                    )
                else:
                    w.done = state.done
                    runnable.append(w)
            await executions.mark_running(conn, [w.command.execution_id for w in runnable])
        return runnable

    async def _run_alone(
        self, conn: AsyncConnection[Any], item: Work, outcomes: list[Outcome]
    ) -> None:
        try:
            async with conn.transaction():
                await self._run(conn, [item], outcomes)
        except UNAVAILABLE:
            raise
        except psycopg.Error as e:
            outcome = self._policy.after_failure(
                item.entry.attempt, f"database error: {e}", **_ids(item.command)
            )
            outcomes[item.index] = outcome
            async with conn.transaction():
                await executions.set_failed(
                    conn, item.command.execution_id, _status(outcome), outcome.reason
                )

    async def _run(
        self, conn: AsyncConnection[Any], work: list[Work], outcomes: list[Outcome]
    ) -> None:
        """Run the steps of every command, then write their effects and statuses."""
        effects = Effects()
        done: list[tuple[str, int, str]] = []
        failures: list[Failure] = []
        completed: list[str] = []
        now = datetime.now(UTC)
        for w in work:
            ids = _ids(w.command)
            step, action = 0, ""
            try:
                wf = await self._definitions.version(
                    w.command.workflow_name, w.command.workflow_version
                )
                for step, (action, params) in enumerate(wf.definition.steps(), start=1):
                    if step in w.done:
                        continue
                    await self._run_step(conn, w.command, step, action, params, effects, now)
                    done.append((w.command.execution_id, step, action))
            except (*UNAVAILABLE, psycopg.Error):
                raise
            except PermanentError as e:
                outcomes[w.index] = dead(str(e), "permanent_error", **ids)
            except Exception as e:  # noqa: BLE001 - any other failure of an action is retried
                outcomes[w.index] = self._policy.after_failure(w.entry.attempt, _describe(e), **ids)
            else:
                completed.append(w.command.execution_id)
                outcomes[w.index] = Outcome(kind="ack", **ids)
                continue
            outcome = outcomes[w.index]
            failures.append(
                Failure(w.command.execution_id, step, action, _status(outcome), outcome.reason)
            )
        await effects.flush(conn)
        await executions.complete_steps(conn, done)
        for f in failures:
            if f.step:
                await executions.fail_step(conn, f.execution_id, f.step, f.action, f.error)
            await executions.set_failed(conn, f.execution_id, f.status, f.error)
        finished = await executions.finish(conn, completed)
        metrics.observe_completed(finished, now)

    async def _run_step(
        self,
        conn: AsyncConnection[Any],
        command: RunWorkflow,
        step: int,
        action: str,
        params: dict[str, Any],
        effects: Effects,
        now: datetime,
    ) -> None:
        action_type = self._actions.get(action)
        if action_type is None:
            raise PermanentError(f"step {step}: unknown action {action!r}")
        try:
            parsed = action_type.parse(params)
        except InvalidEntryError as e:
            raise PermanentError(f"step {step}: {e.reason}") from e
        ctx = StepContext(
            command=command,
            step=step,
            now=now,
            conn=conn,
            effects=Effects(),
            http=self._http,
            settings=self._settings,
        )
        await action_type.run(ctx, parsed)
        # Only a step that returned joins the batch: rows queued by a failed try are dropped.
        effects.take(ctx.effects)


def _ids(command: RunWorkflow) -> EntryIds:
    return {
        "event_id": command.event.id,
        "event_type": command.event.type,
        "execution_id": command.execution_id,
    }


def _status(outcome: Outcome) -> executions.Status:
    return "dead_lettered" if outcome.kind == "dead" else "retrying"


def _describe(error: Exception) -> str:
    """A one-line reason; a time-out or connection error says which."""
    if isinstance(error, httpx.TimeoutException):
        return f"webhook timed out ({type(error).__name__})"
    if isinstance(error, httpx.TransportError):
        return f"webhook unreachable ({type(error).__name__})"
    return str(error) or type(error).__name__
