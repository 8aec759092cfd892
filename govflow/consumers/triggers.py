"""The trigger matcher (group ``triggers``): events in, executions and commands out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.definitions import Definitions
from govflow.consumers.matching import matches
from govflow.consumers.outcomes import Outcome, dead
from govflow.consumers.streams import (
    COMMAND_FIELD,
    EVENT_FIELD,
    REPLAY_FIELD,
    Entry,
    RedisClient,
    event_of,
)
from govflow.core.unavailable import is_unavailable
from govflow.db import executions, reconcile
from govflow.db.executions import NewExecution, Queued
from govflow.db.reconcile import Received
from govflow.schemas.codec import decode_identity, encode
from govflow.schemas.commands import RunWorkflow, execution_id
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.events import Event
from govflow.schemas.keys import Keys, Role

log = structlog.get_logger(__name__)


class TriggerMatcher:
    """Record one execution per (event, matching workflow) and emit its command.

    The execution row commits before its command is emitted. A crash in between leaves
    the row ``queued``; the redelivered event finds it so and emits the command again.

    Every event taken is recorded in ``received_events`` in the same transaction (kept
    whole when it matched a workflow), so the reconciler knows an outbox row was taken up
    and can emit again a command Redis lost. An event published again finds its
    executions: those unfinished and untouched for ``stale_after_s`` get their command
    again (Redis may have lost it), so a re-published event finishes what it started.
    """

    role: Role = "events"

    def __init__(
        self,
        redis: RedisClient,
        pool: AsyncConnectionPool[Any],
        keys: Keys,
        definitions: Definitions,
        stale_after_s: float | None = None,
    ) -> None:
        self._redis = redis
        self._stale_after_s = stale_after_s
        self._pool = pool
        self._keys = keys
        self._definitions = definitions
        # Entries whose executions may be committed while their commands are not all
        # emitted: Redis went away in between, and the loop holds the batch and hands it
        # back. That retry counts no attempt, yet it must emit what is still queued.
        self._unsent: set[str] = set()

    async def handle(self, batch: Sequence[Entry]) -> list[Outcome]:
        """Match a batch of events; every entry is acknowledged unless it is poison."""
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
            outcomes.append(Outcome(
                    kind="ack", event_id=event.id, event_type=event.type, tenant=event.tenant
                ))
        found = await self._match(events)
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
            await self._record_and_emit(found, list(taken.values()), redelivered)
        except psycopg.Error as e:
            if is_unavailable(e):
                raise
            # One event's row was refused and took the batch's transaction with it: record
            # each event alone, so that only the bad one is dead-lettered.
            log.warning("batch.split", size=len(events), exc_info=True)
            for index in events:
                try:
                    alone = {k: v for k, v in found.items() if v[0] == index}
                    await self._record_and_emit(alone, [taken[index]], redelivered)
                except psycopg.Error as e:
                    if is_unavailable(e):
                        raise
                    outcomes[index] = dead(f"Postgres refused the event: {e}", "invalid_entry")
        # Every command went out (an unexpected error instead sends the entries to the
        # retry set under new ids; their stale ids here are harmless).
        self._unsent -= ids
        return outcomes

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
        async with self._pool.connection() as conn, conn.transaction():
            queued = await executions.insert_queued(
                conn, [row for _, row, _ in found.values()], self._stale_after_s
            )
            await reconcile.record_received(conn, taken)
        pipe = self._redis.pipeline(transaction=False)
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
            pipe.xadd(stream, {COMMAND_FIELD: encode(command)})
        if queued:
            await pipe.execute()

    async def _match(
        self, events: dict[int, Event]
    ) -> dict[str, tuple[int, NewExecution, RunWorkflow]]:
        """Each (event, matching workflow) by execution id, with the event's batch index."""
        workflows = await self._definitions.enabled()
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
