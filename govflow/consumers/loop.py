"""The stream worker runtime: one consumer of one group on one stream.

Every group (``triggers``, ``actions``) runs this same loop with its own handler. The
loop reads a batch, hands it to the handler, and ends each entry in exactly one way:
acknowledged, scheduled for a retry, or dead-lettered (``Streams.finish``). While a batch
is in hand its lease is renewed, so a slow handler is not taken over by another worker;
entries left pending by a consumer that died are claimed after ``claim_idle``.

When Postgres or Redis is unreachable the batch is held, not failed: the loop backs off,
keeps the lease, and tries the same batch again, so an outage delays work and loses none.

With partitions leased (``consumers.partitions``) the consumer is the only one of its
group on its partition: it first takes over every entry left pending by earlier owners
(in id order, before reading anything new), reads only while its lease is safely valid,
and every hand-over is fenced: when another worker holds the lease the batch is dropped,
left pending for the new owner, and the consumer stops. Entries that keep their entity's
order run in rounds and park behind a retried one (``consumers.ordering``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from redis import exceptions as redis_errors

from govflow.consumers.ordering import Ordering, Sequencer
from govflow.consumers.outcomes import Outcome, RetryPolicy
from govflow.consumers.streams import (
    ATTEMPT_FIELD,
    HOLD_FIELD,
    Entry,
    Fence,
    HandOver,
    Hold,
    Streams,
)
from govflow.core import metrics
from govflow.core.backoff import Backoff
from govflow.db import dead_letters
from govflow.schemas.errors import GroupMissingError, UnavailableError
from govflow.schemas.keys import GROUP_OF, Keys, Role

log = structlog.get_logger(__name__)

# Redis or Postgres cannot be reached: wait and try again, counting no attempt.
UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    # A cluster mid-failover: a slot without a primary, a multi-key call mid-migration.
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.RedisClusterException,  # no node of the cluster could be reached
    psycopg.OperationalError,
    PoolTimeout,
    UnavailableError,
    OSError,
)
_LOG_EVENT = {
    "ack": "entry.acknowledged",
    "retry": "entry.retried",
    "dead": "entry.dead_lettered",
    "park": "entry.parked",
}
# An acknowledgement is the everyday case, logged at debug (``--log-level debug``): an
# info line for each was the largest single cost in the worker's profile.
_LOG_LEVEL = {
    "ack": logging.DEBUG,
    "retry": logging.INFO,
    "dead": logging.INFO,
    "park": logging.INFO,
}
BLOCK_MS = 1000  # below the client's socket timeout, so a stop is seen within a second
UNREADABLE_POLL_S = 0.1  # how often a consumer whose lease awaits renewal looks again


class Handler(Protocol):
    """What a group does with a batch of its entries."""

    role: Role

    async def handle(self, batch: Sequence[Entry]) -> list[Outcome]:
        """Return one outcome per entry, in order."""
        ...


class Lease(Protocol):
    """What a consumer sees of its partition's lease (``consumers.partitions``)."""

    owner: str

    def readable(self) -> bool:
        """Whether a read started now ends before the lease could lapse."""
        ...


class GroupConsumer:
    """Read one stream as one consumer of its group until ``stop()``."""

    def __init__(
        self,
        *,
        streams: Streams,
        pool: AsyncConnectionPool[Any],
        keys: Keys,
        partition: int,
        handler: Handler,
        consumer: str,
        policy: RetryPolicy,
        batch_size: int,
        claim_idle_s: float,
        lease: Lease | None = None,
        ordering: Ordering | None = None,
        block_ms: int = BLOCK_MS,
    ) -> None:
        self._streams = streams
        self._pool = pool
        self._keys = keys
        self._partition = partition
        self._handler = handler
        self.consumer = consumer
        self.stream = keys.stream(handler.role, partition)
        self.group = GROUP_OF[handler.role]
        self._policy = policy
        self._batch_size = batch_size
        self._claim_idle_ms = int(claim_idle_s * 1000)
        self._renew_every = claim_idle_s / 3
        self._lease = lease
        self._ordering = ordering
        self._block_ms = block_ms
        self._fence = Fence(keys.lease(self.group, partition), lease.owner if lease else "")
        self._held = keys.held(self.group, partition)
        self._drain = lease is not None  # a new owner first takes over what is pending
        self.fenced = False  # set when a hand-over found another worker's lease
        self._stopping = False
        self._backoff = Backoff()
        self._last_claim = 0.0
        self._claim_from = "0-0"  # where the next sweep of the pending list starts

    def stop(self) -> None:
        """Stop reading; the batch in hand is finished first."""
        self._stopping = True

    async def run(self, *, burst: bool = False) -> None:
        """Consume until ``stop()``; with ``burst``, until the group has nothing for us."""
        await self._retry_unavailable(lambda: self._streams.ensure_group(self.stream, self.group))
        log.info("consumer.started", stream=self.stream, group=self.group, consumer=self.consumer)
        while not self._stopping:
            if self._lease is not None and not self._lease.readable():
                await anyio.sleep(UNREADABLE_POLL_S)  # renewed soon, or this consumer stops
                continue
            try:
                batch = await self._next_batch()
            except GroupMissingError:
                log.warning("consumer.group_missing", stream=self.stream, group=self.group)
                await self._retry_unavailable(
                    lambda: self._streams.ensure_group(self.stream, self.group)
                )
                continue
            except UNAVAILABLE as e:
                log.warning("consumer.read_failed", stream=self.stream, error=str(e))
                # After a failover the new primary may show entries delivered and never
                # acknowledged: an owner runs those first, to keep its entities' order.
                self._drain = self._lease is not None
                await anyio.sleep(self._backoff.next_delay())
                continue
            except Exception:
                log.exception("consumer.read_error", stream=self.stream)
                await anyio.sleep(self._backoff.next_delay())
                continue
            self._backoff.reset()
            if batch:
                try:
                    await self._process(batch)
                except UNAVAILABLE as e:
                    log.warning("batch.unfinished", stream=self.stream, error=str(e))
                except Exception:
                    log.exception("batch.unfinished", stream=self.stream, size=len(batch))
                    await anyio.sleep(self._backoff.next_delay())
            elif burst:
                break
        await self._retire()

    async def _next_batch(self) -> list[Entry]:
        if self._drain:
            # Everything earlier owners left pending, oldest first, before anything new:
            # the lease says they are gone, so there is no idle time to wait for.
            claimed, _ = await self._streams.claim_idle(
                self.stream, self.group, self.consumer, 0, self._batch_size
            )
            if claimed:
                log.info("consumer.took_over", stream=self.stream, count=len(claimed))
                return claimed
            self._drain = False
        now = time.monotonic()
        if now - self._last_claim >= self._claim_idle_ms / 2000:
            self._last_claim = now  # set first: a claim that fails must not stop the reads
            claimed, self._claim_from = await self._streams.claim_idle(
                self.stream, self.group, self.consumer, self._claim_idle_ms, self._batch_size,
                self._claim_from,
            )  # fmt: skip
            if self._claim_from != "0-0":  # more of the pending list: sweep on next time
                self._last_claim = 0.0
            if claimed:
                metrics.CLAIMED.labels(self.stream, self.group).inc(len(claimed))
                log.info("consumer.claimed", stream=self.stream, count=len(claimed))
                return claimed
        return await self._streams.read(
            self.stream, self.group, self.consumer, self._batch_size, self._block_ms
        )

    async def _process(self, batch: list[Entry]) -> None:
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_lease, [e.id for e in batch])
            sequencer = await self._sequence(batch)
            outcomes = None if sequencer is None else await self._run_rounds(batch, sequencer)
            tg.cancel_scope.cancel()
        if sequencer is None or outcomes is None:
            return  # stopping while a server is away: the entries stay pending for a claim
        with anyio.CancelScope(shield=True):
            await self._finish(batch, outcomes, sequencer)
        metrics.HANDLER_SECONDS.labels(self.group).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(self.group).observe(len(batch))

    async def _sequence(self, batch: list[Entry]) -> Sequencer | None:
        """Which entries keep their entity's order, and who is in front of each entity."""
        if self._ordering is None:
            return Sequencer([None] * len(batch), {})
        ordering = self._ordering
        holds: list[Hold | None] = []
        holders: dict[str, str] = {}

        async def look_up() -> None:
            nonlocal holds, holders
            holds = await ordering.holds(self._handler.role, batch)
            entities = sorted({h.entity for h in holds if h is not None})
            holders = await self._streams.holders(self._held, entities)

        if not await self._retry_unavailable(look_up):
            return None
        return Sequencer(holds, holders)

    async def _run_rounds(
        self, batch: list[Entry], sequencer: Sequencer
    ) -> list[Outcome | None] | None:
        """Each entry's outcome (None: parked), running the sequencer's rounds in turn."""
        outcomes: list[Outcome | None] = [None] * len(batch)
        while part := sequencer.next_round():
            found = await self._handle([batch[i] for i in part])
            if found is None:
                return None
            for index, outcome in zip(part, found, strict=True):
                outcomes[index] = outcome
                sequencer.ended(index, outcome.kind)
        return outcomes

    async def _handle(self, batch: list[Entry]) -> list[Outcome] | None:
        """The handler's outcomes; held and tried again while a server is unreachable."""
        backoff = Backoff()
        while True:
            try:
                return await self._handler.handle(batch)
            except UNAVAILABLE as e:
                if self._stopping:
                    return None
                log.warning("batch.held", stream=self.stream, size=len(batch), error=str(e))
                await anyio.sleep(backoff.next_delay())
            except Exception as e:
                log.exception("batch.failed", stream=self.stream, size=len(batch))
                reason = f"{type(e).__name__}: {e}"
                return [self._policy.after_failure(entry.attempt, reason) for entry in batch]

    async def _keep_lease(self, ids: list[str]) -> None:
        """Renew the lease on the entries in hand until the batch is done."""
        while ids:
            await anyio.sleep(self._renew_every)
            try:
                kept = await self._streams.renew(self.stream, self.group, self.consumer, ids)
            except UNAVAILABLE as e:
                log.warning("lease.renew_failed", stream=self.stream, error=str(e))
                continue
            lost = set(ids) - kept
            if lost:
                log.warning("lease.lost", stream=self.stream, ids=sorted(lost))
                ids = [i for i in ids if i in kept]

    async def _finish(
        self, batch: list[Entry], outcomes: list[Outcome | None], sequencer: Sequencer
    ) -> None:
        """Hand each entry over to where its outcome says, surviving server outages."""
        letters = [
            dead_letters.NewDeadLetter(
                stream=entry.stream,
                message_id=entry.id,
                payload={_storable(k): _storable(v) for k, v in entry.payload().items()},
                error=_storable(outcome.reason),
                attempts=entry.attempt,
                event_id=outcome.event_id,
                event_type=outcome.event_type,
                execution_id=outcome.execution_id,
            )
            for entry, outcome in zip(batch, outcomes, strict=True)
            if outcome is not None and outcome.kind == "dead"
        ]
        if letters and not await self._retry_unavailable(lambda: self._record(letters)):
            return
        items = [
            self._hand_over(index, entry, outcome, sequencer)
            for index, (entry, outcome) in enumerate(zip(batch, outcomes, strict=True))
        ]
        accepted = True

        async def hand_over() -> None:
            nonlocal accepted
            accepted = await self._streams.finish(
                self.stream,
                self.group,
                items,
                fence=self._fence,
                held=self._held,
                parked=lambda entity: self._keys.parked(self.group, entity, self._partition),
            )

        if not await self._retry_unavailable(hand_over):
            return
        if not accepted:
            # Another worker holds the partition now: it takes these entries over from
            # the pending list (their effects are idempotent); this one must stop here.
            log.warning("partition.fenced", stream=self.stream, size=len(batch))
            self.fenced = True
            self._stopping = True
            return
        for entry, item, outcome in zip(batch, items, outcomes, strict=True):
            cause = outcome.cause if outcome is not None else "held"
            metrics.ENTRIES.labels(self.stream, self.group, item.kind, cause or "ok").inc()
            log.log(
                _LOG_LEVEL[item.kind],
                _LOG_EVENT[item.kind],
                stream=self.stream,
                entry_id=entry.id,
                event_id=outcome.event_id if outcome else None,
                execution_id=outcome.execution_id if outcome else None,
                attempt=entry.attempt,
                reason=(outcome.reason or None) if outcome else None,
            )

    def _hand_over(
        self, index: int, entry: Entry, outcome: Outcome | None, sequencer: Sequencer
    ) -> HandOver:
        """Where entry ``index`` goes, with its hold when it keeps its entity's order."""
        hold = sequencer.holds[index]
        token = {HOLD_FIELD: hold.token.encode()} if hold is not None else {}
        if outcome is None:  # parked: no attempt is counted
            fields = {**entry.fields, ATTEMPT_FIELD: str(entry.attempt).encode(), **token}
            return HandOver(entry_id=entry.id, kind="park", hold=hold, fields=fields)
        if outcome.kind == "ack":
            front = hold if index in sequencer.fronts else None
            return HandOver(entry_id=entry.id, kind="ack", hold=front)
        if outcome.kind == "retry":
            return HandOver(
                entry_id=entry.id,
                kind="retry",
                hold=hold,
                target=self._keys.retry(self._partition),
                due=time.time() + self._policy.delay(entry.attempt),
                role=self._handler.role,
                fields={**entry.fields, ATTEMPT_FIELD: str(entry.attempt + 1).encode(), **token},
            )
        return HandOver(
            entry_id=entry.id,
            kind="dead",
            hold=hold,
            target=self._keys.dead(self._partition),
            record=_dead_fields(entry, outcome),
        )

    async def _record(self, letters: list[dead_letters.NewDeadLetter]) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await dead_letters.record(conn, letters)

    async def _retire(self) -> None:
        """Leave the group if nothing is pending here; otherwise leave it for a claim."""
        with anyio.move_on_after(5, shield=True):
            try:
                await self._streams.retire(self.stream, self.group, self.consumer)
            except UNAVAILABLE:
                pass
        log.info("consumer.stopped", stream=self.stream, group=self.group, consumer=self.consumer)

    async def _retry_unavailable(self, call: Any) -> bool:
        """Run ``call`` until it succeeds, backing off while a server is unreachable.

        Once stopping, give up instead: whatever was not handed over stays pending, and
        whoever claims it finds the committed work and finishes the hand-over.
        """
        backoff = Backoff()
        while True:
            try:
                await call()
            except UNAVAILABLE as e:
                log.warning("server.unavailable", stream=self.stream, error=str(e))
                if self._stopping:
                    return False
                await anyio.sleep(backoff.next_delay())
            else:
                return True


def _storable(text: str) -> str:
    """``text`` without NUL, which Postgres text and jsonb refuse and a poison entry may hold."""
    return text.replace("\x00", "\ufffd")


def _dead_fields(entry: Entry, outcome: Outcome) -> dict[str, str]:
    """The dead-letter stream entry: where it came from, why, and the original fields."""
    record = {
        "stream": entry.stream,
        "message_id": entry.id,
        "error": outcome.reason,
        "attempts": str(entry.attempt),
    }
    record.update({f"payload.{k}": v for k, v in entry.payload().items()})
    return record
