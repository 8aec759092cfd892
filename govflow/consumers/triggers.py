"""The trigger matcher (group ``triggers``): events in, executions and commands out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from govflow.consumers import traces
from govflow.consumers.definitions import Definitions
from govflow.consumers.matching import matches
from govflow.consumers.outcomes import Outcome, dead
from govflow.consumers.streams import (
    COMMAND_FIELD,
    EVENT_FIELD,
    REPLAY_FIELD,
    Entry,
    Streams,
    event_of,
    read_at,
)
from govflow.core.unavailable import is_unavailable
from govflow.db import chains, executions
from govflow.db.executions import NewExecution, Queued
from govflow.db.pool import autocommit
from govflow.db.reconcile import Received
from govflow.schemas.codec import decode_identity, encode
from govflow.schemas.commands import RunWorkflow, execution_id
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.events import Event
from govflow.schemas.keys import Keys, Role

log = structlog.get_logger(__name__)


class ChainTooBroadError(Exception):
    """Chained events would take their roots past the bound on executions per root."""

    def __init__(self, over: dict[int, str]) -> None:
        super().__init__(f"{len(over)} chained events over the bound")
        self.over = over  # batch index -> reason


class TriggerMatcher:
    """Record one execution per (event, matching workflow) and emit its command.

    The execution row commits before its command is emitted. A crash in between leaves
    the row ``queued``; the redelivered event finds it so and emits the command again.

    Every event taken is recorded in ``received_events`` by the same statement (kept
    whole when it matched a workflow), so the reconciler knows an outbox row was taken up
    and can emit again a command Redis lost. An event published again finds its
    executions: those unfinished and untouched for ``stale_after_s`` get their command
    again (Redis may have lost it), so a re-published event finishes what it started.
    A chained event whose executions would take its root event past
    ``max_chain_executions`` records none, and is dead-lettered (``db.chains``).
    """

    role: Role = "events"

    def __init__(
        self,
        streams: Streams,
        pool: AsyncConnectionPool[Any],
        keys: Keys,
        definitions: Definitions,
        stale_after_s: float | None = None,
        max_chain_executions: int = 1000,
    ) -> None:
        self._streams = streams
        self._stale_after_s = stale_after_s
        self._max_chain = max_chain_executions
        self._pool = pool
        self._keys = keys
        self._definitions = definitions
        # Entries whose executions may be committed while their commands are not all
        # emitted: Redis went away in between, and the loop holds the batch and hands it
        # back. That retry counts no attempt, yet it must emit what is still queued.
        self._unsent: set[str] = set()

    async def handle(self, batch: Sequence[Entry]) -> list[Outcome]:
        """Match a batch of events; every entry is acknowledged unless it is poison."""
        spans = traces.Matches()
        outcomes: list[Outcome] = []
        try:
            outcomes = await self._handle(batch, spans)
        finally:
            spans.end(outcomes)
        return outcomes

    async def _handle(self, batch: Sequence[Entry], spans: traces.Matches) -> list[Outcome]:
        outcomes: list[Outcome] = []
        events: dict[int, Event] = {}
        taken: dict[int, Received] = {}
        for index, entry in enumerate(batch):
            try:
                event = event_of(entry)
            except InvalidEntryError as e:
                outcomes.append(dead(e.reason, "invalid_entry"))
                if (identity := _identity(entry)) is not None:
                    taken[index] = identity  # dead-lettered: taken up all the same
                continue
            events[index] = event
            spans.start(index, event)
            outcomes.append(
                Outcome(kind="ack", event_id=event.id, event_type=event.type, tenant=event.tenant)
            )
        found = await self._match(events, spans, since=read_at(batch))
        matched = {index for index, _, _ in found.values()}
        for index, event in events.items():
            kept = encode(event).decode() if index in matched else None
            taken[index] = Received(event.tenant, event.id, kept)
        redelivered = {
            i
            for i in events
            if batch[i].attempt > 1 or batch[i].field(REPLAY_FIELD) or batch[i].id in self._unsent
        }
        ids = {batch[i].id for i in events}
        self._unsent |= ids
        try:
            found = await self._record_within_bounds(
                found, list(taken.values()), redelivered, outcomes
            )
        except psycopg.Error as e:
            if is_unavailable(e):
                raise
            # One event's row was refused and took the batch's transaction with it: record
            # each event alone, so that only the bad one is dead-lettered.
            log.warning("batch.split", size=len(events), exc_info=True)
            for index in events:
                try:
                    alone = {k: v for k, v in found.items() if v[0] == index}
                    await self._record_within_bounds(alone, [taken[index]], redelivered, outcomes)
                except psycopg.Error as e:
                    if is_unavailable(e):
                        raise
                    outcomes[index] = dead(f"Postgres refused the event: {e}", "invalid_entry")
        # Every command went out (an unexpected error instead sends the entries to the
        # retry set under new ids; their stale ids here are harmless).
        self._unsent -= ids
        return outcomes

    async def _record_within_bounds(
        self,
        found: dict[str, tuple[int, NewExecution, RunWorkflow]],
        taken: Sequence[Received],
        redelivered: set[int],
        outcomes: list[Outcome],
    ) -> dict[str, tuple[int, NewExecution, RunWorkflow]]:
        """Record and emit; dead-letter the chained events a root's bound refuses.

        Returns what was recorded (without the refused events).
        """
        try:
            await self._record_and_emit(found, taken, redelivered)
        except ChainTooBroadError as e:  # nothing was recorded: again, without them
            for index, reason in e.over.items():
                command = next(c for i, _, c in found.values() if i == index)
                outcomes[index] = dead(
                    reason,
                    "permanent_error",
                    event_id=command.event.id,
                    event_type=command.event.type,
                    tenant=command.event.tenant,
                )
            found = {k: v for k, v in found.items() if v[0] not in e.over}
            await self._record_and_emit(found, taken, redelivered)
        return found

    async def _charge_chains(
        self,
        conn: Any,
        found: dict[str, tuple[int, NewExecution, RunWorkflow]],
        queued: list[executions.Queued],
    ) -> None:
        """Count the new executions of chained events against their roots.

        Raises:
            ChainTooBroadError: some root would pass the bound (the caller rolls back).
        """
        new: dict[tuple[str, str], int] = {}
        for execution in queued:
            event = found[execution.derived][2].event
            if execution.new and event.depth > 0:
                root = (event.tenant, event.root)
                new[root] = new.get(root, 0) + 1
        totals = await chains.charge(conn, new)
        over = {
            index: (
                f"the chain of event {command.event.root} (tenant {command.event.tenant}) would"
                f" cause {totals[command.event.tenant, command.event.root]} executions, over"
                f" GOVFLOW_MAX_CHAIN_EXECUTIONS ({self._max_chain})"
            )
            for index, _, command in found.values()
            if totals.get((command.event.tenant, command.event.root), 0) > self._max_chain
        }
        if over:
            raise ChainTooBroadError(over)

    async def _record_and_emit(
        self,
        found: dict[str, tuple[int, NewExecution, RunWorkflow]],
        taken: Sequence[Received],
        redelivered: set[int],
    ) -> None:
        """Commit the executions and the events taken, then emit the commands of the new
        executions (and of those found unfinished that may have lost theirs), with the
        version their row records."""
        if not found and not taken:
            return
        rows = [row for _, row, _ in found.values()]
        if any(command.event.depth > 0 for _, _, command in found.values()):
            # Chained events are charged to their roots in the same transaction.
            async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
                queued = await executions.insert_queued(conn, rows, self._stale_after_s, taken)
                await self._charge_chains(conn, found, queued)
        else:  # one statement, which commits alone: no transaction to open and close
            async with autocommit(self._pool) as conn:
                queued = await executions.insert_queued(conn, rows, self._stale_after_s, taken)
        emitted: dict[str, list[bytes]] = {}
        for execution in queued:
            index, _, command = found[execution.derived]
            if not _emit(execution, index in redelivered):
                continue
            if (command.workflow_version, command.execution_id) != (
                execution.workflow_version,
                execution.id,
            ):
                command = msgspec.structs.replace(
                    command, workflow_version=execution.workflow_version, execution_id=execution.id
                )
            stream = self._keys.commands(self._keys.partition_of(command.event.entity_id))
            emitted.setdefault(stream, []).append(encode(command))
        await self._streams.append(COMMAND_FIELD, emitted)

    async def _match(
        self, events: dict[int, Event], spans: traces.Matches, *, since: float
    ) -> dict[str, tuple[int, NewExecution, RunWorkflow]]:
        """Each (event, matching workflow) by execution id, with the event's batch index;
        its command carries the trace context of the event's match. The definitions are
        those enabled as of a read begun after the batch was read (``since``)."""
        workflows = await self._definitions.enabled(since=since)
        found: dict[str, tuple[int, NewExecution, RunWorkflow]] = {}
        for index, event in events.items():
            for wf in workflows:
                if not matches(wf.definition, event):
                    continue
                exec_id = execution_id(event.tenant, event.id, wf.name)
                row = NewExecution(
                    exec_id, wf.name, wf.version, event.id, event.entity,
                    event.entity_id, event.tenant, event.occurred_at,
                )  # fmt: skip
                command = RunWorkflow(
                    execution_id=exec_id,
                    workflow_name=wf.name,
                    workflow_version=wf.version,
                    event=event,
                    **spans.fields(index),
                )
                found[exec_id] = (index, row, command)
        return found


def _emit(execution: Queued, redelivered: bool) -> bool:
    """Whether to emit an execution's command.

    A first delivery never re-emits a command for an execution found still queued and
    fresh: the delivery that recorded it emits it, or, if it crashed first, is redelivered.
    """
    if execution.new or execution.stale:
        return True
    return redelivered and execution.status == "queued"


def _identity(entry: Entry) -> Received | None:
    """The (tenant, id) of an entry that is no event, when its JSON still names them."""
    try:
        found = decode_identity(entry.field(EVENT_FIELD) or b"")
    except InvalidEntryError:
        return None
    return Received(found.tenant if isinstance(found.tenant, str) else "", found.id)
