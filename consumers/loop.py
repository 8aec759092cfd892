"""The stream worker runtime: one consumer of one group on one stream.

Every group (``triggers``, ``actions``) runs this same loop with its own handler. The
loop reads a batch, hands it to the handler, and ends each entry in exactly one way:
acknowledged, scheduled for a retry, or dead-lettered (``Streams.finish``). While a batch
is in hand its lease is renewed, so a slow handler is not taken over by another worker;
entries left pending by a consumer that died are claimed after ``claim_idle``.

When Postgres or Redis is unreachable the batch is held, not failed: the loop backs off,
keeps the lease, and tries the same batch again, so an outage delays work and loses none.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from redis import exceptions as redis_errors

from consumers import metrics
from consumers.backoff import Backoff
from consumers.outcomes import Outcome, RetryPolicy
from consumers.streams import ATTEMPT_FIELD, Entry, Streams
from db import dead_letters
from schemas.errors import GroupMissingError, UnavailableError
from schemas.keys import GROUP_OF, Keys, Role

log = structlog.get_logger(__name__)

# Redis or Postgres cannot be reached: wait and try again, counting no attempt.
UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    psycopg.OperationalError,
    PoolTimeout,
    UnavailableError,
    OSError,
)
_LOG_EVENT = {"ack": "entry.acknowledged", "retry": "entry.retried", "dead": "entry.dead_lettered"}
BLOCK_MS = 1000  # below the client's socket timeout, so a stop is seen within a second


class Handler(Protocol):
    """What a group does with a batch of its entries."""

    role: Role

    async def handle(self, batch: Sequence[Entry]) -> list[Outcome]:
        """Return one outcome per entry, in order."""
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
        self._stopping = False
        self._backoff = Backoff()
        self._last_claim = 0.0

    def stop(self) -> None:
        """Stop reading; the batch in hand is finished first."""
        self._stopping = True

    async def run(self, *, burst: bool = False) -> None:
        """Consume until ``stop()``; with ``burst``, until the group has nothing for us."""
        await self._retry_unavailable(lambda: self._streams.ensure_group(self.stream, self.group))
        log.info("consumer.started", stream=self.stream, group=self.group, consumer=self.consumer)
        while not self._stopping:
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
                await anyio.sleep(self._backoff.next_delay())
                continue
            self._backoff.reset()
            if batch:
                await self._process(batch)
            elif burst:
                break
        await self._retire()

    async def _next_batch(self) -> list[Entry]:
        now = time.monotonic()
        if now - self._last_claim >= self._claim_idle_ms / 2000:
            self._last_claim = now
            claimed = await self._streams.claim_idle(
                self.stream, self.group, self.consumer, self._claim_idle_ms, self._batch_size
            )
            if claimed:
                metrics.CLAIMED.labels(self.stream, self.group).inc(len(claimed))
                log.info("consumer.claimed", stream=self.stream, count=len(claimed))
                return claimed
        return await self._streams.read(
            self.stream, self.group, self.consumer, self._batch_size, BLOCK_MS
        )

    async def _process(self, batch: list[Entry]) -> None:
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_lease, [e.id for e in batch])
            outcomes = await self._handle(batch)
            tg.cancel_scope.cancel()
        if outcomes is None:
            return  # stopping while a server is away: the entries stay pending for a claim
        with anyio.CancelScope(shield=True):
            await self._finish(batch, outcomes)
        metrics.HANDLER_SECONDS.labels(self.group).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(self.group).observe(len(batch))

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

    async def _finish(self, batch: list[Entry], outcomes: list[Outcome]) -> None:
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
            if outcome.kind == "dead"
        ]
        if letters and not await self._retry_unavailable(lambda: self._record(letters)):
            return
        acks = [e.id for e, o in zip(batch, outcomes, strict=True) if o.kind == "ack"]
        retries = [
            (e.id, self._keys.retry(self._partition), time.time() + self._policy.delay(e.attempt), self._handler.role,
             {**e.fields, ATTEMPT_FIELD: str(e.attempt + 1).encode()})
            for e, o in zip(batch, outcomes, strict=True)
            if o.kind == "retry"
        ]  # fmt: skip
        dead = [
            (e.id, self._keys.dead(self._partition), _dead_fields(e, o))
            for e, o in zip(batch, outcomes, strict=True)
            if o.kind == "dead"
        ]
        handed_over = await self._retry_unavailable(
            lambda: self._streams.finish(
                self.stream, self.group, acks=acks, retries=retries, dead=dead
            )
        )
        if not handed_over:
            return
        for entry, outcome in zip(batch, outcomes, strict=True):
            metrics.ENTRIES.labels(
                self.stream, self.group, outcome.kind, outcome.cause or "ok"
            ).inc()
            log.info(
                _LOG_EVENT[outcome.kind],
                stream=self.stream,
                entry_id=entry.id,
                event_id=outcome.event_id,
                execution_id=outcome.execution_id,
                attempt=entry.attempt,
                reason=outcome.reason or None,
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
