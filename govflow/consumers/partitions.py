"""Partition leases: each partition of a group is consumed by one worker at a time.

With ``GOVFLOW_PARTITIONS`` above 1, a worker does not read every partition: per group it
runs a ``PartitionLeases`` that

- beats in the group's membership set (``{prefix}:workers:{group}``, scored by the Redis
  server's clock), which says how many workers of the group are alive;
- aims at a fair share, ``ceil(partitions / live workers)``, preferring the partitions
  ``p`` with ``p % live == its rank`` among the live workers, so shares settle the same
  way every time;
- takes a free partition with ``SET lease <worker id> NX PX ttl`` and runs one
  ``GroupConsumer`` on it; renews its leases every ``ttl / 3`` with a compare-and-PEXPIRE;
- gives surplus partitions up when workers join: it stops their consumers (each finishes
  the batch in hand), then deletes the lease if it still holds it, and a worker below its
  share takes the partition at its next beat. A worker that leaves (SIGTERM) gives up all
  of its partitions the same way; one that dies loses them when their leases lapse.

A partition is never consumed by two workers at once: a consumer reads only while its
lease has at least two read timeouts left (``PartitionLease.readable``), so a worker that
cannot renew stops reading before its lease can lapse, and every hand-over of an entry
(acknowledge, retry, dead-letter, park) is fenced on the lease's value, so a worker that
lost its lease mid-batch cannot acknowledge (``consumers.scripts``): it drops the batch,
the new owner takes the entries over and runs them again (effects are idempotent).

Two limits, both covered by fencing and idempotent effects rather than by the lease: a
worker frozen (not merely slow) between its lease check and the read it then sends can
still receive entries after its lease lapsed; they stay pending until the owner's
periodic claim (``GOVFLOW_CLAIM_IDLE``), possibly after newer entries of the same entity.
And a primary's failover can roll group state back (replication is asynchronous): the
consumer then runs first whatever the new primary shows as delivered and unacknowledged.

Leases follow health. A worker that cannot reach Redis stops renewing, and gives its
partitions up once their leases may have lapsed. One that reaches Redis but not Postgres
(``healthy`` says so, ``core.health``: no answer for longer than a lease) gives every
partition up and leaves the membership, so the workers that remain count one fewer and
take its share; it joins again once Postgres answers.

Rebalancing takes a few lease periods: a joining worker is seen at the others' next beat
(``ttl / 3``), which stop their surplus consumers; the newcomer takes them at its own next
beat. A dead worker's partitions wait for its leases to lapse (``ttl``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import anyio
import structlog
from anyio.abc import TaskGroup

from govflow.consumers import scripts
from govflow.consumers.streams import BLOCK_MS, Entry, RedisClient, Streams
from govflow.core.unavailable import REDIS_FAILED, UNAVAILABLE
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)

RELEASE_TIMEOUT_S = 5.0  # a lease not deleted by then lapses on its own
UNREADABLE_POLL_S = 0.1  # how often a consumer whose lease awaits renewal looks again


class PartitionLease:
    """One partition's lease, as its consumer sees it."""

    def __init__(self, owner: str, ttl_s: float) -> None:
        self.owner = owner
        self.ttl_s = ttl_s
        # Reads block for at most a fifth of the lease, so a read started while the lease
        # has two of those left ends before it can lapse.
        self.block_ms = min(BLOCK_MS, int(ttl_s * 1000) // 5)
        self._read_window_s = ttl_s - 2 * self.block_ms / 1000
        self.renewed_at = time.monotonic()  # when the last renewal that succeeded was sent

    def readable(self) -> bool:
        """Whether a read started now ends before the lease could lapse."""
        return time.monotonic() < self.renewed_at + self._read_window_s

    def lapsed(self) -> bool:
        """Whether the lease may have lapsed in Redis (no renewal for a whole ttl)."""
        return time.monotonic() >= self.renewed_at + self.ttl_s


class PlainReads(Protocol):
    """A consumer's own reads, which the partition layer wraps."""

    async def next(self) -> list[Entry]:
        """New entries, or entries idle long enough to claim."""
        ...

    async def take_over(self) -> list[Entry]:
        """Entries pending for other consumers, whatever their idle time, oldest first."""
        ...


class LeasedReads:
    """The partition layer of a consumer's reads: read only what the lease allows.

    A read starts only while the lease is safely valid. A new owner first takes over
    every entry left pending by earlier owners (in id order, before reading anything
    new): the lease says they are gone, so there is no idle time to wait for. It does so
    again after a failed read: after a failover the new primary may show entries
    delivered and never acknowledged, and an owner runs those first, to keep its
    entities' order.
    """

    def __init__(self, reads: PlainReads, lease: PartitionLease, stream: str) -> None:
        self._reads = reads
        self._lease = lease
        self._stream = stream
        self._taking_over = True

    async def next(self) -> list[Entry]:
        """The next batch: taken over, claimed or read; none while the lease is not safe."""
        if not self._lease.readable():
            await anyio.sleep(UNREADABLE_POLL_S)  # renewed soon, or this consumer stops
            return []
        if self._taking_over:
            taken = await self._reads.take_over()
            if taken:
                log.info("consumer.took_over", stream=self._stream, count=len(taken))
                return taken
            self._taking_over = False
        return await self._reads.next()

    def failed(self) -> None:
        """A read failed (perhaps a failover): take over what is pending first."""
        self._taking_over = True


class PartitionConsumer(Protocol):
    """The consumer of one partition (``consumers.loop.GroupConsumer``)."""

    fenced: bool  # it stopped because another worker holds the lease

    async def run(self) -> None:
        """Consume until stopped or fenced."""
        ...

    def stop(self) -> None:
        """Stop after the batch in hand."""
        ...


ConsumerFactory = Callable[[int, PartitionLease], PartitionConsumer]


class _Owned:
    """A partition this worker holds, and its consumer."""

    def __init__(self, consumer: PartitionConsumer, lease: PartitionLease) -> None:
        self.consumer = consumer
        self.lease = lease
        self.leaving = False  # given up or lost: the consumer is stopping


class PartitionLeases:
    """Hold leases on a fair share of one group's partitions; run a consumer on each.

    Args:
        redis: the client (a Redis Cluster client works: each call touches one key).
        keys: the deployment's key names and partition count.
        group: the consumer group (``triggers`` or ``actions``).
        worker_id: this worker's identity, unique in the deployment: the lease's value.
        ttl_s: how long a lease lasts without renewal.
        make_consumer: builds the consumer of a partition once its lease is taken.
        healthy: whether this worker can do the work (it reaches Postgres); while it
            says no, the worker holds no partition and is not counted as a member.
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        group: str,
        worker_id: str,
        ttl_s: float,
        make_consumer: ConsumerFactory,
        healthy: Callable[[], bool] = lambda: True,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.group = group
        self.worker_id = worker_id
        self._ttl_s = ttl_s
        self._ttl_ms = int(ttl_s * 1000)
        self._make_consumer = make_consumer
        self._healthy = healthy
        self._streams = Streams(redis)
        self._owned: dict[int, _Owned] = {}
        self._stopped = anyio.Event()
        self._emptied = anyio.Event()  # set when no consumer runs any more, once stopping

    def owned(self) -> frozenset[int]:
        """The partitions whose consumers run here and are not being given up."""
        return frozenset(p for p, o in self._owned.items() if not o.leaving)

    def reading(self) -> frozenset[int]:
        """The partitions whose consumers may start a read now (held, leases fresh)."""
        return frozenset(p for p, o in self._owned.items() if not o.leaving and o.lease.readable())

    def consuming(self) -> frozenset[int]:
        """The partitions whose consumers still run, those being given up included."""
        return frozenset(self._owned)

    def stop(self) -> None:
        """Stop every consumer (each finishes its batch), give the leases up, leave."""
        self._stopped.set()

    async def run(self) -> None:
        """Beat, renew, rebalance every ``ttl / 3`` until ``stop()``."""
        async with anyio.create_task_group() as tg:
            while not self._stopped.is_set():
                try:
                    await self._beat(tg)
                except REDIS_FAILED:
                    # A refusal the cluster client raises mid-failover must not stop the
                    # worker: what was not renewed is given up once it may have lapsed,
                    # and the next beat tries again. A bug in govflow still ends it.
                    log.exception("partitions.beat_error", group=self.group)
                with anyio.move_on_after(self._ttl_s / 3):
                    await self._stopped.wait()
            for owned in self._owned.values():
                owned.consumer.stop()
            # Batches in hand may outlast a lease: keep renewing until they are finished.
            while self._owned:
                await self._renew_all()
                with anyio.move_on_after(self._ttl_s / 3):
                    await self._emptied.wait()
        with anyio.move_on_after(RELEASE_TIMEOUT_S, shield=True):
            try:
                await self._streams.run(self._beat_call(leaving=True))
            except UNAVAILABLE:
                pass  # the membership entry lapses on its own
        log.info("partitions.left", group=self.group, worker=self.worker_id)

    def _beat_call(self, *, leaving: bool = False) -> scripts.ScriptCall:
        return scripts.beat(
            members=self._keys.workers(self.group),
            worker=self.worker_id,
            ttl_ms=self._ttl_ms,
            leaving=leaving,
        )

    async def _beat(self, tg: TaskGroup) -> None:
        """Renew what is held, then (if the membership answers) take or give up partitions.

        On a cluster the leases live on different shards: one shard away must not cost
        the partitions of the others, so each call stands alone.
        """
        await self._renew_all()
        if not self._healthy():
            for p, owned in list(self._owned.items()):
                self._leave(p, owned, "partition.unhealthy")
            try:  # counted out, so that the others take this worker's share
                await self._streams.run(self._beat_call(leaving=True))
            except UNAVAILABLE:
                pass  # the membership entry lapses on its own
            return
        try:
            raw: list[bytes] = await self._streams.run(self._beat_call())
        except UNAVAILABLE as e:
            log.warning("partitions.beat_failed", group=self.group, error=str(e))
            return
        live = sorted(m.decode() for m in raw)
        if self.worker_id not in live:  # only a server that drops writes gets here
            live = sorted([*live, self.worker_id])
        share = math.ceil(self._keys.partitions / len(live))
        rank = live.index(self.worker_id)
        preferred = [p for p in self._keys.all_partitions() if p % len(live) == rank]
        active = sorted(self.owned())
        if len(active) > share:
            # Give up the partitions another worker prefers first, the highest first.
            surplus = sorted(active, key=lambda p: (p in preferred, -p))[: len(active) - share]
            for p in surplus:
                self._leave(p, self._owned[p], "partition.giving_up")
            return
        others = [p for p in self._keys.all_partitions() if p not in preferred]
        for p in preferred + others:
            if len(active) >= share:
                break
            if p in self._owned:
                continue
            try:
                if await self._take(tg, p):
                    active.append(p)
            except UNAVAILABLE as e:
                log.warning("partition.take_failed", group=self.group, partition=p, error=str(e))

    async def _renew_all(self) -> None:
        for p, owned in list(self._owned.items()):
            sent = time.monotonic()
            try:
                renewed = await self._streams.run(
                    scripts.renew_lease(
                        lease=self._keys.lease(self.group, p),
                        owner=self.worker_id,
                        ttl_ms=self._ttl_ms,
                    )
                )
            except REDIS_FAILED as e:
                log.warning("partition.renew_failed", group=self.group, partition=p, error=str(e))
                # Not renewed for a whole ttl: another worker may hold it by now.
                renewed = not owned.lease.lapsed()
            else:
                if renewed:
                    owned.lease.renewed_at = sent
            if not renewed:
                self._leave(p, owned, "partition.lost")

    async def _take(self, tg: TaskGroup, p: int) -> bool:
        """Take partition ``p`` if it is free, and start its consumer."""
        lease = PartitionLease(self.worker_id, self._ttl_s)
        taken = await self._redis.set(
            self._keys.lease(self.group, p), self.worker_id, nx=True, px=self._ttl_ms
        )
        if not taken:
            return False
        owned = _Owned(self._make_consumer(p, lease), lease)
        self._owned[p] = owned
        log.info("partition.taken", group=self.group, partition=p, worker=self.worker_id)
        tg.start_soon(self._serve, p, owned)
        return True

    async def _serve(self, p: int, owned: _Owned) -> None:
        """Run a partition's consumer; once it returns, give the lease up if still held."""
        try:
            await owned.consumer.run()
        finally:
            del self._owned[p]
            if self._stopped.is_set() and not self._owned:
                self._emptied.set()
            with anyio.move_on_after(RELEASE_TIMEOUT_S, shield=True):
                try:
                    await self._streams.run(
                        scripts.release_lease(
                            lease=self._keys.lease(self.group, p), owner=self.worker_id
                        )
                    )
                except UNAVAILABLE:
                    pass  # it lapses within a ttl
            if owned.consumer.fenced:
                log.warning("partition.fenced", group=self.group, partition=p)
            log.info("partition.released", group=self.group, partition=p)

    def _leave(self, p: int, owned: _Owned, event: str) -> None:
        """Stop a partition's consumer (unless it stopped already) and say why."""
        if owned.leaving or self._owned.get(p) is not owned:
            return
        owned.leaving = True
        owned.consumer.stop()
        log.info(event, group=self.group, partition=p, worker=self.worker_id)
