"""The action workers (group ``actions``): run each execution's steps, once each.

A batch runs in three moves, and no transaction stays open while the outside world is
called:

1. **start**: one short transaction starts a delivery of each unfinished execution: it
   shows it ``running``, bumps its fencing token (``db.fencing``) and reads its
   finished steps.
2. **perform**: every execution's I/O steps (webhooks, ``@action(..., io=True)``) run
   concurrently, outside any transaction, within a per-worker and a per-host bound and
   each within its time limit.
3. **record**: as executions finish performing, their database steps run and every
   step's effect rows and status are written, a few executions to one short
   transaction (whatever is ready within ``RECORD_LINGER_S`` commits together). So a
   database-only execution commits at once, never behind a slow receiver, and
   ``finished_at`` is the time of that short commit. Each of those transactions first
   checks the tokens of its executions: one that another worker has started since (this
   worker stalled past its claim or its lease) writes nothing, and its entry is left to
   the worker that owns it.

A batch with nothing to perform outside (every step a database one) skips the second
move and records in the transaction that locked its executions: one commit, not two; its
executions are never seen ``running``, and each one's row is written once, by the final
write that also starts the delivery (``db.fencing``). It is written whole, without a
savepoint; should Postgres refuse one execution's SQL, the batch runs again and each
execution is written alone, so that only that one fails.

An execution whose path reaches a step that waits for a person (``wait: true``,
``schemas.flow``) records that step and is shown ``waiting``; its entry is acknowledged,
and a decision or a deadline emits its command again later (``operations.decisions``).

The entries are acknowledged only after the whole batch is recorded. A redelivered command
finds its completed steps and skips them, so no database effect happens twice; a webhook
performed but not recorded (a crash, an outage) is sent again with the same
``Idempotency-Key``.

Where an exception comes from decides what it means (``core.unavailable``): one raised
by an action's code is that step's failure (``ActionFailedError``) and counts an attempt;
one raised by govflow's own reads and writes may mean a server is unavailable, and then
the batch is held.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiohttp
import anyio
import httpx
import msgspec
import psycopg
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from govflow.consumers import traces
from govflow.consumers.definitions import Definitions
from govflow.consumers.outcomes import ACK, EntryIds, Outcome, RetryPolicy, dead, later
from govflow.consumers.streams import REPLAY_FIELD, Entry, command_of
from govflow.core import metrics
from govflow.core.unavailable import is_unavailable
from govflow.db import decisions, executions, fencing, webhook_keys
from govflow.plugins import ActionType, Effects, StepContext, egress, webhook
from govflow.plugins.hosts import HostSlots
from govflow.plugins.registry import registry
from govflow.schemas import flow
from govflow.schemas.commands import RunWorkflow
from govflow.schemas.errors import (
    ActionFailedError,
    InvalidEntryError,
    PermanentError,
    RetryLater,
)
from govflow.schemas.keys import Role
from govflow.schemas.settings import Settings
from govflow.schemas.workflows import StoredWorkflow

log = structlog.get_logger(__name__)

# How often a worker re-reads the signing keys, so a rotation reaches every worker.
KEYS_REFRESH_S = 30.0
# When an execution held elsewhere (``fencing.lock``'s busy) is tried again.
BUSY_RETRY_S = 1.0
# How long an execution performed waits for others to be recorded with it.
RECORD_LINGER_S = 0.01
# What a step's own code may raise to end the step: a failure, never an outage.
STEP_ERRORS = (ActionFailedError, PermanentError, RetryLater)


class Step(msgspec.Struct):
    """One step still to run: its action, parameters, time limit, and effects once performed."""

    number: int
    action: ActionType[Any]
    params: Any
    timeout: float
    performed: Effects | None = None


class StepFailure(msgspec.Struct, frozen=True):
    """The step an execution failed at, and why."""

    step: int
    action: str
    error: Exception


class Work(msgspec.Struct):
    """A command to run, its steps, and what became of it."""

    index: int
    entry: Entry
    command: RunWorkflow
    done: frozenset[int] = frozenset()
    steps: list[Step] = []
    failure: StepFailure | None = None  # an I/O step's, or a step that cannot run
    outcome: Outcome | None = None
    epoch: int = 0  # the epoch its writes are held to: the token once claimed
    decided: Mapping[int, str] = {}  # the outcome of each step it waits on, by step
    waits_at: int | None = None  # the step it waits at once its steps are done


class Clients(NamedTuple):
    """The worker's HTTP clients, shared by every step it runs."""

    http: httpx.AsyncClient  # for plug-ins (``StepContext.http``)
    webhooks: aiohttp.ClientSession  # for signed webhooks (``plugins.webhook``)


@contextlib.asynccontextmanager
async def open_clients(
    request_timeout: float, allowed: frozenset[str], concurrency: int = 1
) -> AsyncIterator[Clients]:
    """The worker's HTTP clients, open while the block runs: each connects only where
    ``allowed`` admits, with ``concurrency`` requests in flight."""
    async with (
        egress.http_client(request_timeout, allowed, concurrency) as http,
        webhook.client(request_timeout, allowed, concurrency) as webhooks,
    ):
        yield Clients(http, webhooks)


class ActionRunner:
    """The handler of the ``actions`` group."""

    role: Role = "commands"

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        definitions: Definitions,
        policy: RetryPolicy,
        settings: Settings,
        clients: Clients,
    ) -> None:
        self._pool = pool
        self._definitions = definitions
        self._policy = policy
        self._settings = settings
        self._clients = clients
        # Loaded here, so that a plug-in that fails to load stops the worker at start.
        self._actions = registry()
        self._io_slots = anyio.CapacityLimiter(settings.io_concurrency)
        self._hosts = HostSlots(settings.webhook_host_concurrency)
        self._keys: tuple[str, ...] = tuple(settings.webhook_secret.split())
        self._keys_loaded_at = float("-inf")
        self._specs: dict[tuple[str, int], list[flow.StepSpec]] = {}

    async def handle(self, batch: Sequence[Entry]) -> list[Outcome]:
        """Run a batch of commands; return each entry's outcome."""
        outcomes, work = self._commands(batch)
        if not work:
            return outcomes
        try:
            await self._run(work, outcomes, whole=True)
        except _WholeBatchRefusedError:
            # One command's SQL failed and took the batch's transaction with it: the batch
            # again, each execution written alone (logged as ``batch.split``), so that only
            # the bad one fails.
            outcomes, work = self._commands(batch)
            await self._run(work, outcomes, whole=False)
        return outcomes

    def _commands(self, batch: Sequence[Entry]) -> tuple[list[Outcome], list[Work]]:
        """Each entry's outcome, set already where there is nothing to run, and the work:
        one per execution."""
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
        return outcomes, work

    async def _run(self, work: list[Work], outcomes: list[Outcome], *, whole: bool) -> None:
        """Start, perform and record ``work``, setting the outcomes of its entries.

        ``whole``: a batch with nothing to perform outside writes all its executions
        together, without a savepoint (two statements fewer), and raises
        ``_WholeBatchRefusedError`` if one of them fails; otherwise each one that fails
        is written alone.
        """
        # Read before a connection is taken, so that planning needs no second one; once
        # for each workflow version of the batch.
        waiting = {v for v in {_version(w) for w in work} if await self._may_wait(*v)}
        may_wait = {w.command.execution_id for w in work if _version(w) in waiting}
        recorded = False
        # Pipelined: the statements go out together, and each read waits for its own.
        async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            work = await self._start(conn, work, outcomes, may_wait)
            await self._load_keys(conn)
            for w in work:
                await self._plan(w)
            if any(step.action.io for w in work for step in w.steps):
                tokens = await fencing.claim(conn, {w.command.execution_id: w.epoch for w in work})
                for w in work:
                    w.epoch = tokens[w.command.execution_id]
            else:
                # Nothing to perform outside: the batch is recorded in the transaction
                # that locked it, one commit instead of two, and each execution's row is
                # written once.
                if whole:
                    await self._write_whole(conn, work)
                else:
                    await self._record_on(conn, work, started=True)
                recorded = True
        if not recorded:
            await self._perform_and_record(work)
        for w in work:
            assert w.outcome is not None  # every execution performed is recorded
            outcomes[w.index] = w.outcome
            metrics.count_execution(w.command.workflow_name, w.outcome.kind)

    async def _start(
        self,
        conn: AsyncConnection[Any],
        work: list[Work],
        outcomes: list[Outcome],
        may_wait: Collection[str],
    ) -> list[Work]:
        """Lock each unfinished execution for a delivery; return what is left to run.

        The lock comes first, so the completed steps read after it are the last word:
        whoever would write for these executions waits for this transaction, and finds
        its delivery started. One held by another transaction past ``fencing.lock``'s
        patience is retried later, counting no attempt. The outcomes of waits are read
        for the executions in ``may_wait`` only.
        """
        ids = [w.command.execution_id for w in work]
        replays = [w.command.execution_id for w in work if w.entry.field(REPLAY_FIELD) is not None]
        epochs, busy = await fencing.lock(conn, ids, replays=replays)
        states = await executions.states(conn, ids)
        waits = await decisions.outcomes(conn, [i for i in ids if i in may_wait])
        runnable = []
        for w in work:
            found = _ids(w.command)
            state = states.get(w.command.execution_id)
            epoch = epochs.get(w.command.execution_id)
            if state is None:
                outcomes[w.index] = dead(
                    "the execution row does not exist", "invalid_entry", **found
                )
            elif w.command.execution_id in busy:
                # Another transaction has held it for a while: a worker frozen mid-write
                # perhaps. Waiting would stall the whole batch for as long; it comes back.
                outcomes[w.index] = later(
                    "the execution is held by another transaction", "busy", BUSY_RETRY_S, **found
                )
            elif epoch is not None:
                w.done, w.epoch = state.done, epoch
                w.decided = waits.get(w.command.execution_id, {})
                runnable.append(w)
            elif state.status == "dead_lettered":
                # Dead-lettered by an earlier delivery that died before handing over.
                outcomes[w.index] = dead(
                    state.last_error or "dead-lettered", "permanent_error", **found
                )
            else:  # completed already, or cancelled: nothing left to run
                outcomes[w.index] = Outcome(kind="ack", **found)
        return runnable

    async def _load_keys(self, conn: AsyncConnection[Any]) -> None:
        """Re-read the signing keys kept in Postgres, when no key is set and they are stale."""
        if self._settings.webhook_secret or (
            anyio.current_time() - self._keys_loaded_at < KEYS_REFRESH_S
        ):
            return
        self._keys = tuple(await webhook_keys.signing(conn, self._settings.webhook_key_grace))
        self._keys_loaded_at = anyio.current_time()

    async def _plan(self, w: Work) -> None:
        """The steps to run now, in order, each parsed; a step that cannot run is the failure.

        Which steps: those not done on the execution's path (``schemas.flow.path``), up to
        the step it waits at, or through the branch of a wait's outcome.
        """
        command = w.command
        try:
            wf = await self._definitions.version(command.workflow_name, command.workflow_version)
        except PermanentError as e:  # the definition is gone
            w.failure = StepFailure(0, "", e)
            return
        specs = self._specs_of(wf)
        path = flow.path(specs, w.done, w.decided)
        w.waits_at = path.waits_at
        for number in path.run:
            spec = specs[number - 1]
            action_type = self._actions.get(spec.action)
            if action_type is None:
                unknown = PermanentError(f"step {number}: unknown action {spec.action!r}")
                w.failure = StepFailure(number, spec.action, unknown)
                return
            try:
                params = action_type.parse(spec.params)
            except InvalidEntryError as e:
                reason = PermanentError(f"step {number}: {e.reason}")
                w.failure = StepFailure(number, spec.action, reason)
                return
            timeout = spec.timeout or self._settings.step_timeout
            w.steps.append(Step(number, action_type, params, timeout))

    def _specs_of(self, wf: StoredWorkflow) -> list[flow.StepSpec]:
        """A version's steps, numbered once per worker: a version never changes."""
        specs = self._specs.get((wf.name, wf.version))
        if specs is None:
            specs = self._specs[(wf.name, wf.version)] = wf.definition.specs()
        return specs

    async def _may_wait(self, name: str, version: int) -> bool:
        """Whether a workflow version has a step that waits for a person, so that its
        executions' waits are read; true when the definition is gone (``_plan`` says so)."""
        try:
            wf = await self._definitions.version(name, version)
        except PermanentError:
            return True
        return any(spec.wait for spec in self._specs_of(wf))

    async def _perform_and_record(self, work: list[Work]) -> None:
        """Perform every execution's I/O steps; record each execution once it is performed.

        Raises:
            Exception: what recording raised (a server unavailable: the batch is held).
        """
        send, receive = anyio.create_memory_object_stream[Work](len(work))
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            async with send:
                for w in work:
                    if any(step.action.io for step in w.steps):
                        tg.start_soon(self._perform, w, send.clone())
                    else:  # nothing to perform: ready now, without a task of its own
                        send.send_nowait(w)
            try:
                await self._record_as_ready(receive)
            except Exception as e:  # noqa: BLE001 - raised below, unwrapped by the task group
                error = e
                tg.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _perform(self, w: Work, ready: MemoryObjectSendStream[Work]) -> None:
        """Run ``w``'s I/O steps in order, stopping at the first that fails; then hand it on."""
        async with ready:
            for step in w.steps:  # all before any step found unable to run
                if not step.action.io:
                    continue
                try:
                    async with self._io_slots:
                        step.performed = await self._call(w, step, None)
                except STEP_ERRORS as e:
                    w.failure = StepFailure(step.number, step.action.name, e)
                    break
            # Closed only when recording failed, and this task is being cancelled then.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await ready.send(w)

    async def _record_as_ready(self, ready: MemoryObjectReceiveStream[Work]) -> None:
        """Record executions as they are performed: whatever is ready commits together.

        While more are being performed, the first one ready waits ``RECORD_LINGER_S`` for
        others to join it: a transaction costs the worker about as much CPU for one
        execution as for ten, and webhooks finish one by one.
        """
        async with ready:
            async for first in ready:
                if ready.statistics().open_send_streams:
                    await anyio.sleep(RECORD_LINGER_S)
                group = [first]
                while True:
                    try:
                        group.append(ready.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._record(group)

    async def _record(self, group: list[Work]) -> None:
        """Write a group's effects and statuses in a transaction of their own."""
        # Pipelined: the effects' rows and statuses go out with the last read.
        async with self._pool.connection() as conn, conn.pipeline():
            await self._record_on(conn, group)

    async def _record_on(
        self, conn: AsyncConnection[Any], group: list[Work], *, started: bool = False
    ) -> None:
        """Write a group's effects and statuses in one transaction (a savepoint, within
        the batch's own); each execution alone after a refusal. ``started``: the group's
        deliveries were locked in this transaction, not claimed, and the final writes
        start them (``fencing.STARTED``)."""
        try:
            async with conn.transaction():
                await self._write(conn, group, started)
        except psycopg.Error as e:
            if is_unavailable(e):
                raise
            # One command's SQL failed and aborted the transaction: write each alone,
            # so that only the bad one fails. Webhooks already performed are not resent.
            log.warning("batch.split", size=len(group), exc_info=True)
            for w in group:
                if w.outcome is None or w.outcome.kind != "fenced":  # refused for good
                    await self._write_alone(conn, w, started)

    async def _write_whole(self, conn: AsyncConnection[Any], work: list[Work]) -> None:
        """Write a batch started in this transaction, all of it or nothing.

        Raises:
            _WholeBatchRefusedError: one execution's SQL failed; the transaction is lost.
        """
        try:
            await self._write(conn, work, started=True)
        except psycopg.Error as e:
            if is_unavailable(e):
                raise
            raise _WholeBatchRefusedError from e

    async def _write_alone(self, conn: AsyncConnection[Any], w: Work, started: bool) -> None:
        try:
            async with conn.transaction():
                await self._write(conn, [w], started)
        except psycopg.Error as e:
            if is_unavailable(e):
                raise
            outcome = w.outcome
            if outcome is None or outcome.kind == "ack":  # govflow's own write was refused
                outcome = self._policy.after_failure(
                    w.entry.attempt, f"database error: {e}", **_ids(w.command)
                )
            async with conn.transaction():
                if await fencing.hold(conn, {w.command.execution_id: w.epoch}):
                    w.outcome = _fenced(w)
                    return
                await executions.set_failed(
                    conn, w.command.execution_id, _status(outcome), outcome.reason, started=started
                )
            w.outcome = outcome

    async def _write(self, conn: AsyncConnection[Any], group: list[Work], started: bool) -> None:
        """Run the database steps, then write every effect and status of ``group``.

        First, the fence: an execution that another delivery has started since this one
        writes nothing, not even through its database steps. The rows of the others stay
        locked until the commit, so every write below is made under their tokens. A group
        ``started`` in this transaction has held its rows since ``fencing.lock``: nothing
        can have started since.
        """
        tokens = {} if started else {w.command.execution_id: w.epoch for w in group}
        refused = await fencing.hold(conn, tokens)
        for w in group:
            if w.command.execution_id in refused:
                w.outcome = _fenced(w)
        group = [w for w in group if w.command.execution_id not in refused]
        effects = Effects()
        done: list[tuple[str, int, str]] = []
        failures: list[tuple[Work, StepFailure]] = []
        completed: list[str] = []
        waiting: list[tuple[str, int]] = []
        for w in group:
            failure = w.failure
            for step in w.steps:  # in the order they run
                if failure is not None and step.number == failure.step:
                    break
                try:
                    step_effects = step.performed
                    if step_effects is None:
                        step_effects = await self._call(w, step, conn)
                except STEP_ERRORS as e:
                    failure = StepFailure(step.number, step.action.name, e)
                    break
                effects.extend(step_effects)
                done.append((w.command.execution_id, step.number, step.action.name))
            if failure is None:
                w.outcome = Outcome(kind="ack", **_ids(w.command))
                if w.waits_at is None:
                    completed.append(w.command.execution_id)
                else:
                    waiting.append((w.command.execution_id, w.waits_at))
            else:
                w.outcome = self._outcome(w, failure.error)
                failures.append((w, failure))
        await effects.flush(conn)
        await executions.complete_steps(conn, done)
        for w, f in failures:
            assert w.outcome is not None
            reason, execution_id = w.outcome.reason, w.command.execution_id
            if f.step:
                await executions.fail_step(conn, execution_id, f.step, f.action, reason)
            await executions.set_failed(
                conn, execution_id, _status(w.outcome), reason, started=started
            )
        await decisions.set_waiting(conn, waiting, started=started)
        finished = await executions.finish(conn, completed, started=started)
        metrics.observe_completed(finished, datetime.now(UTC))

    async def _call(self, w: Work, step: Step, conn: AsyncConnection[Any] | None) -> Effects:
        """Run one step, timed and counted by workflow, action and outcome."""
        with metrics.observe_step(w.command.workflow_name, step.action.name):
            return await self._run_action(w, step, conn)

    async def _run_action(self, w: Work, step: Step, conn: AsyncConnection[Any] | None) -> Effects:
        """Run one step's action within its time limit; return the rows it queued.

        Raises:
            PermanentError: the action said no other try can help.
            RetryLater: the action asked to be tried again after a delay.
            ActionFailedError: anything else the action raised, or it ran out of time.
        """
        ctx = StepContext(
            command=w.command,
            step=step.number,
            now=datetime.now(UTC),
            transaction=conn,
            effects=Effects(),
            http=self._clients.http,
            webhooks=self._clients.webhooks,
            settings=self._settings,
            hosts=self._hosts,
            signing_keys=self._keys,
        )
        try:
            with traces.step(w.command, step.number, step.action.name):
                timed_out = await _within_limit(step, ctx)
        except (PermanentError, RetryLater):
            raise
        except Exception as e:
            raise ActionFailedError(_describe(e)) from e
        if timed_out:
            raise ActionFailedError(
                f"step {step.number} ({step.action.name}) took longer than {step.timeout:g} s"
            )
        return ctx.effects

    def _outcome(self, w: Work, error: Exception) -> Outcome:
        ids = _ids(w.command)
        if isinstance(error, PermanentError):
            return dead(str(error), "permanent_error", **ids)
        if isinstance(error, RetryLater):
            return self._policy.after_failure(
                w.entry.attempt, error.reason, delay=error.seconds, **ids
            )
        reason = error.reason if isinstance(error, ActionFailedError) else str(error)
        return self._policy.after_failure(w.entry.attempt, reason, **ids)


async def _within_limit(step: Step, ctx: StepContext) -> bool:
    """Run the step's action; return whether it ran out of time.

    An action that never awaits (``ActionType.suspends``) runs to its end once started:
    no limit could stop it, so none is set (a cancel scope and its timer cost 8 us a
    step, 5 % of a draining worker's time).
    """
    if not step.action.suspends:
        await step.action.run(ctx, step.params)
        return False
    with anyio.move_on_after(step.timeout) as limit:
        await step.action.run(ctx, step.params)
    return limit.cancelled_caught


class _WholeBatchRefusedError(Exception):
    """A batch written whole was refused: Postgres failed one of its executions' SQL."""


def _fenced(w: Work) -> Outcome:
    """Leave ``w``'s entry to the delivery that owns its execution now, and say so."""
    metrics.FENCED.inc()
    log.warning(
        "execution.fenced",
        execution_id=w.command.execution_id,
        event_id=w.command.event.id,
        entry_id=w.entry.id,
        epoch=w.epoch,
        reason="another delivery started this execution since: this one writes nothing",
    )
    return Outcome(kind="fenced", **_ids(w.command))


def _version(w: Work) -> tuple[str, int]:
    """The workflow version ``w`` runs: its name and number."""
    return w.command.workflow_name, w.command.workflow_version


def _ids(command: RunWorkflow) -> EntryIds:
    return {
        "event_id": command.event.id,
        "event_type": command.event.type,
        "execution_id": command.execution_id,
        "tenant": command.event.tenant,
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
