"""The stream worker runtime: one consumer of one group on one stream.

Every group (``triggers``, ``actions``) runs this same loop with its own handler: read a
batch, handle it, settle each entry (``consumers.settle``: acknowledged, scheduled for a
retry, dead-lettered or parked). While a batch is in hand its entries' idle time is
renewed, so a slow handler is not claimed by another consumer; entries left pending by a
consumer that died are claimed after ``claim_idle``.

When Postgres or Redis is unavailable (``core.unavailable``) the batch is held, not
failed: the loop backs off, keeps the entries, and tries the same batch again, so an
outage delays work and loses none.

Two layers are added only when configured:

- Partition leases (``GOVFLOW_PARTITIONS`` of 2 or more; ``consumers.partitions``): the
  reads go through ``LeasedReads``, and every hand-over is fenced on the lease. When
  another worker holds the lease the batch is left pending for the new owner and the
  consumer stops.
- Per-entity order (``consumers.ordering``): a batch some of whose entries keep their
  entity's order runs in rounds, and entries park behind a retried one; any other batch
  runs in one go.

An operator may pause a group (``consumers.pause``): its consumers then take no entries
until it resumes; the batch in hand finishes first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
import structlog
from psycopg_pool import AsyncConnectionPool

from govflow.consumers import traces
from govflow.consumers.ordering import Ordering
from govflow.consumers.outcomes import Outcome, RetryPolicy
from govflow.consumers.partitions import LeasedReads, PartitionLease
from govflow.consumers.pause import CHECK_S, PauseFlag
from govflow.consumers.scripts import Fence
from govflow.consumers.settle import Settler, Verdict
from govflow.consumers.streams import BLOCK_MS, Entry, Streams
from govflow.core import metrics
from govflow.core.backoff import Backoff
from govflow.core.progress import Progress
from govflow.core.unavailable import UNAVAILABLE, GaveUpError, is_unavailable, until_available
from govflow.schemas.errors import GroupMissingError
from govflow.schemas.keys import GROUP_OF, Keys, Role

log = structlog.get_logger(__name__)
T = TypeVar("T")


class Handler(Protocol):
    """What a group does with a batch of its entries."""

    role: Role

    async def handle(self, batch: Sequence[Entry]) -> list[Outcome]:
        """Return one outcome per entry, in order."""
        ...


class Reads(Protocol):
    """Where a consumer's batches come from."""

    async def next(self) -> list[Entry]:
        """The next batch, maybe empty."""
        ...

    def failed(self) -> None:
        """A read failed."""
        ...


class GroupConsumer:
    """Read one stream as one consumer of its group until ``stop()``.

    Args:
        hold_max_s: how long a batch is held while a server is unavailable before the
            attempt counts as failed.
        lease: the partition's lease, when partitions are leased (the partition layer).
        ordering: which entries keep their entity's order (the ordering layer).
        progress: marked after each batch settled and each read that found nothing new,
            for the worker's heartbeat.
    """

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
        hold_max_s: float = float("inf"),
        lease: PartitionLease | None = None,
        ordering: Ordering | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._streams = streams
        self._progress = progress or Progress()
        self._handler = handler
        self.consumer = consumer
        self.stream = keys.stream(handler.role, partition)
        self.group = GROUP_OF[handler.role]
        self._policy = policy
        self._renew_every = claim_idle_s / 3
        self._hold_max_s = hold_max_s
        self._ordering = ordering
        self._partition = partition
        reads = GroupReads(
            streams, self.stream, self.group, consumer, batch_size, claim_idle_s,
            block_ms=BLOCK_MS if lease is None else lease.block_ms,
        )  # fmt: skip
        self._reads: Reads = reads if lease is None else LeasedReads(reads, lease, self.stream)
        fence = None if lease is None else Fence(keys.lease(self.group, partition), lease.owner)
        self._settler = Settler(
            streams=streams, pool=pool, keys=keys, role=handler.role, partition=partition,
            policy=policy, fence=fence, stopping=lambda: self._stopping,
        )  # fmt: skip
        self._pause = PauseFlag(streams.redis, keys, self.group)
        self.fenced = False  # set when a hand-over found another worker's lease
        self._stopping = False
        self._backoff = Backoff()

    def stop(self) -> None:
        """Stop reading; the batch in hand is finished first."""
        self._stopping = True

    async def run(self) -> None:
        """Consume until ``stop()``: read a batch, handle it, settle each entry."""
        with contextlib.suppress(GaveUpError):  # stopping while Redis is away
            await self._until_available(self._ensure_group)
            log.info(
                "consumer.started", stream=self.stream, group=self.group, consumer=self.consumer
            )
            while not self._stopping:
                if await self._pause.paused():
                    await anyio.sleep(CHECK_S)
                    continue
                batch = await self._read()
                if batch:
                    await self._process(batch)
        await self._retire()

    async def _read(self) -> list[Entry]:
        """The next batch; none after a failed read, once backed off."""
        try:
            batch = await self._reads.next()
        except GroupMissingError:
            log.warning("consumer.group_missing", stream=self.stream, group=self.group)
            await self._until_available(self._ensure_group)
            return []
        except Exception as e:
            if is_unavailable(e):
                log.warning("consumer.read_failed", stream=self.stream, error=str(e))
                self._reads.failed()
            else:
                log.exception("consumer.read_error", stream=self.stream)
            await anyio.sleep(self._backoff.next_delay())
            return []
        self._backoff.reset()
        if not batch:
            self._progress.mark()  # idle, and polling as it should
        return batch

    async def _process(self, batch: list[Entry]) -> None:
        """Handle a batch, then settle each entry; what is not settled stays pending."""
        started = time.perf_counter()
        try:
            verdicts: list[Verdict] | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_pending, [e.id for e in batch])
                with contextlib.suppress(GaveUpError):  # stopping while a server is away
                    verdicts = await self._verdicts(batch)
                tg.cancel_scope.cancel()
            if verdicts is None:
                return  # the entries stay pending for a claim
            with anyio.CancelScope(shield=True):
                settled = await self._settler.settle(verdicts)
        except GaveUpError:
            return  # whoever claims the entries finds the committed work and settles them
        except Exception as e:
            if is_unavailable(e):
                log.warning("batch.unfinished", stream=self.stream, error=str(e))
                return
            log.exception("batch.unfinished", stream=self.stream, size=len(batch))
            await anyio.sleep(self._backoff.next_delay())
            return
        if not settled:
            # Another worker holds the partition now: it takes these entries over from
            # the pending list (their effects are idempotent); this one must stop here.
            log.warning("partition.fenced", stream=self.stream, size=len(batch))
            self.fenced = self._stopping = True
            return
        metrics.HANDLER_SECONDS.labels(self.group).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(self.group).observe(len(batch))
        self._progress.mark()

    async def _verdicts(self, batch: list[Entry]) -> list[Verdict]:
        """Handle the batch: in rounds when some of its entries keep their entity's order."""
        ordering = self._ordering
        if ordering is not None:
            role, partition = self._handler.role, self._partition
            rounds = await self._until_available(lambda: ordering.rounds(role, partition, batch))
            if rounds is not None:
                return await rounds.run(batch, self._handle)
        outcomes = await self._handle(batch)
        return [Verdict(entry=e, outcome=o) for e, o in zip(batch, outcomes, strict=True)]

    async def _handle(self, batch: list[Entry]) -> list[Outcome]:
        """The handler's outcomes; held and tried again while a server is unavailable.

        Raises:
            GaveUpError: stopping while a server is unavailable.
        """
        backoff = Backoff()
        held_since = time.monotonic()
        while True:
            try:
                with traces.batch(self._handler.role, self.stream, len(batch)):
                    return await self._handler.handle(batch)
            except Exception as e:
                if not is_unavailable(e):
                    log.exception("batch.failed", stream=self.stream, size=len(batch))
                    return self._failed(batch, f"{type(e).__name__}: {e}")
                if self._stopping:
                    raise GaveUpError(str(e)) from e
                held = time.monotonic() - held_since
                if held >= self._hold_max_s:
                    # An outage this long, or an error mistaken for one: the attempt counts,
                    # so that no batch is held for good.
                    log.warning("batch.held_too_long", stream=self.stream, held_s=round(held))
                    return self._failed(batch, f"a server was unavailable for {held:.0f} s: {e}")
                log.warning("batch.held", stream=self.stream, size=len(batch), error=str(e))
                await anyio.sleep(backoff.next_delay())

    def _failed(self, batch: list[Entry], reason: str) -> list[Outcome]:
        """Every entry of the batch failed this attempt with ``reason``."""
        return [self._policy.after_failure(entry.attempt, reason) for entry in batch]

    async def _keep_pending(self, ids: list[str]) -> None:
        """Renew the idle time of the entries in hand until the batch is done."""
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

    async def _ensure_group(self) -> None:
        await self._streams.ensure_group(self.stream, self.group)

    async def _retire(self) -> None:
        """Leave the group if nothing is pending here; otherwise leave it for a claim."""
        with anyio.move_on_after(5, shield=True):
            with contextlib.suppress(*UNAVAILABLE):
                await self._streams.retire(self.stream, self.group, self.consumer)
        log.info("consumer.stopped", stream=self.stream, group=self.group, consumer=self.consumer)

    async def _until_available(self, call: Callable[[], Awaitable[T]]) -> T:
        return await until_available(call, stopping=lambda: self._stopping, stream=self.stream)


class GroupReads:
    """A consumer's reads: new entries, and every ``claim_idle / 2`` the idle ones."""

    def __init__(
        self,
        streams: Streams,
        stream: str,
        group: str,
        consumer: str,
        batch_size: int,
        claim_idle_s: float,
        *,
        block_ms: int,
    ) -> None:
        self._streams = streams
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._batch_size = batch_size
        self._claim_idle_ms = int(claim_idle_s * 1000)
        self._block_ms = block_ms
        self._last_claim = 0.0
        self._claim_from = "0-0"  # where the next sweep of the pending list starts

    async def next(self) -> list[Entry]:
        """Entries idle long enough to claim, when a claim is due, else new entries."""
        now = time.monotonic()
        if now - self._last_claim >= self._claim_idle_ms / 2000:
            self._last_claim = now  # set first: a claim that fails must not stop the reads
            claimed, self._claim_from = await self._streams.claim_idle(
                self._stream, self._group, self._consumer, self._claim_idle_ms,
                self._batch_size, self._claim_from,
            )  # fmt: skip
            if self._claim_from != "0-0":  # more of the pending list: sweep on next time
                self._last_claim = 0.0
            if claimed:
                metrics.CLAIMED.labels(self._stream, self._group).inc(len(claimed))
                log.info("consumer.claimed", stream=self._stream, count=len(claimed))
                return claimed
        return await self._streams.read(
            self._stream, self._group, self._consumer, self._batch_size, self._block_ms
        )

    async def take_over(self) -> list[Entry]:
        """Every entry pending for another consumer, oldest first, whatever its idle time."""
        claimed, _ = await self._streams.claim_idle(
            self._stream, self._group, self._consumer, 0, self._batch_size
        )
        return claimed

    def failed(self) -> None:
        """Nothing to do: the next read simply tries again."""
