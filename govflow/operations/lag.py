"""How far behind each consumer group is: in entries, and in seconds.

``read_lag`` reports, per stream and group, what ``govflow lag`` shows, plus whether the
lag in entries is exact (``lag_valid``). Redis 7 reports a group's ``lag`` in ``XINFO GROUPS``
but reports NULL after an entry ahead of the group was deleted or trimmed, and Redis 6.2
has no such field at all (exporters then show 0, as if nothing waited). In both cases
govflow counts the entries after the group's last-delivered id itself, inside Redis and
bounded by ``scan_limit``; only a backlog larger than that on both sides of the
last-delivered id is an estimate, and says so with ``lag_valid=false``.

Ages come from entry ids, whose first part is the Redis server's clock in milliseconds
when the entry was added; "now" is the server's ``TIME`` too, so a skewed client clock
changes nothing.

A stream that does not exist yet is reported with zeros. A stream whose group does not
exist yet (events published before any worker started) is reported with every entry as
lag: govflow creates its groups at the start of the stream, so that is what the group
will have to deliver.

This module reads Redis replies itself (``XINFO`` is read nowhere on the hot path); the
Prometheus gauges are set by ``export_gauges``, every few seconds by ``LagGauges`` in
each worker. The ``govflow lag`` command is in govflow/cli/lag.py.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import structlog
from psycopg_pool import AsyncConnectionPool
from redis import exceptions as redis_errors

from govflow.consumers.pause import Pause, read_pauses
from govflow.consumers.streams import RedisClient
from govflow.core import metrics
from govflow.core.service import run_every
from govflow.db import dead_letters, decisions, outbox, reconcile
from govflow.producers import metrics as producer_metrics
from govflow.schemas.keys import GROUP_OF, Keys, Role

log = structlog.get_logger(__name__)

# Entries counted per side of a group's last-delivered id before the lag becomes an
# estimate. Counting runs inside Redis (no payload crosses the network) at roughly a
# millisecond per thousand entries, and blocks the server meanwhile.
SCAN_LIMIT = 10_000
PARKED_LIMIT = 1_000  # held entities whose parked entries are counted, per group and partition
REFRESH_S = 5.0
OVERDUE_AFTER_S = 120.0  # the default of GOVFLOW_RECONCILE_AFTER

# KEYS: stream. ARGV: start, end, limit. Returns {how many entries in [start, end], up to
# limit; the first one's id or nil}.
_COUNT_RANGE = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
local first = false
if #entries > 0 then first = entries[1][1] end
return {#entries, first}
"""

ROLES: tuple[Role, ...] = ("events", "commands")


class ConsumerLag(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One consumer of a group: what it holds and how long it has been quiet."""

    name: str
    pending: int
    idle_s: float  # since its last attempted interaction (read, claim, ack)
    inactive_s: float | None = None  # since its last successful one; Redis 7.2+ only


class GroupLag(msgspec.Struct, frozen=True, kw_only=True):
    """One group of one stream (an element of ``govflow lag --json``)."""

    stream: str
    group: str
    length: int  # entries in the stream: retained history, not backlog
    lag: int  # entries not yet delivered to the group
    lag_valid: bool  # false: ``lag`` is an estimate
    pending: int  # delivered, not yet acknowledged
    oldest_pending_age_s: float | None
    oldest_undelivered_age_s: float | None
    consumers: list[ConsumerLag] = []
    # Per-entity order (``ordering: entity``): entities held behind an entry of theirs
    # that is retrying, and their entries parked meanwhile, counted in neither lag nor
    # pending (they were delivered and acknowledged into the parked lists).
    held_entities: int = 0
    parked: int = 0  # counted behind the first PARKED_LIMIT held entities: a lower bound past it
    paused: bool = False  # an operator paused the group (``govflow pause``): nothing is read


class OutboxBacklog(msgspec.Struct, frozen=True, kw_only=True):
    """Outbox rows the relay has not yet published."""

    waiting: int
    oldest_age_s: float | None
    # Published longer than the reconcile bound ago and never taken up by the trigger
    # matcher: the reconciler publishes them again unless Redis still carries them.
    overdue: int = 0


class LagReport(msgspec.Struct, frozen=True, kw_only=True):
    """Everything ``govflow lag`` shows."""

    groups: list[GroupLag]
    retry_scheduled: int
    dead_letters: int  # open rows in Postgres; without a pool, the dead-letter streams' length
    outbox: OutboxBacklog | None  # None without a pool
    # Executions queued, running or retrying and untouched for longer than the reconcile
    # bound (GOVFLOW_RECONCILE_AFTER): slow, or lost by Redis and soon put back. 0 without a pool.
    overdue: int = 0
    waiting: int = 0  # executions waiting for a person (0 without a pool)
    timers_due: int = 0  # deadlines past due and not yet fired (0 without a pool)
    approvals_pending: int = 0
    tasks_open: int = 0
    paused: list[Pause] = []  # the groups paused, by whom, since when and why


async def read_lag(
    redis: RedisClient,
    pool: AsyncConnectionPool[Any] | None,
    keys: Keys,
    *,
    scan_limit: int = SCAN_LIMIT,
    overdue_after_s: float = OVERDUE_AFTER_S,
) -> LagReport:
    """Measure every group of every partition's streams, the retries, dead letters and outbox.

    Args:
        redis: a client with ``decode_responses=False``.
        pool: the database; ``None`` counts dead letters from the dead-letter streams and
            reports no outbox.
        keys: the deployment's key names (every partition is read).
        scan_limit: entries counted per side of a group's last-delivered id before the
            lag becomes an estimate.
        overdue_after_s: the reconcile bound: work untouched this long is overdue.
    """
    seconds, micros = await redis.time()
    reader = _Reader(redis, now_ms=seconds * 1000 + micros // 1000, scan_limit=scan_limit)
    behind = await _held_and_parked(redis, keys)
    pauses = await read_pauses(redis, keys)
    groups: list[GroupLag] = []
    for p in keys.all_partitions():
        for role in ROLES:
            group = GROUP_OF[role]
            held, parked = behind[group, p]
            groups += [
                msgspec.structs.replace(
                    g, held_entities=held, parked=parked, paused=group in pauses
                )
                if g.group == group
                else g
                for g in await reader.stream(keys.stream(role, p), group)
            ]
    pipe = redis.pipeline(transaction=False)
    for p in keys.all_partitions():
        pipe.zcard(keys.retry(p))
    for p in keys.all_partitions():
        pipe.xlen(keys.dead(p))
    counts: list[int] = await pipe.execute()
    retry_scheduled = sum(counts[: keys.partitions])
    backlog: OutboxBacklog | None = None
    overdue = 0
    people = decisions.Waiting(0, 0, 0, 0)
    if pool is None:
        dead = sum(counts[keys.partitions :])
    else:
        async with pool.connection() as conn:
            dead = await dead_letters.count_open(conn)
            waiting, oldest = await outbox.backlog(conn)
            overdue, outbox_overdue = await reconcile.count_overdue(conn, overdue_after_s)
            people = await decisions.count_waiting(conn)
        backlog = OutboxBacklog(waiting=waiting, oldest_age_s=oldest, overdue=outbox_overdue)
    return LagReport(
        groups=groups,
        retry_scheduled=retry_scheduled,
        dead_letters=dead,
        outbox=backlog,
        overdue=overdue,
        **msgspec.structs.asdict(people),
        paused=sorted(pauses.values(), key=lambda x: x.group),
    )


async def _held_and_parked(
    redis: RedisClient, keys: Keys
) -> dict[tuple[str, int], tuple[int, int]]:
    """Per (group, partition): the entities held, and the entries parked behind them.

    Two round trips whatever the partitions: every held hash, then the parked lists of
    up to ``PARKED_LIMIT`` held entities per group and partition (beyond that, ``parked``
    is a lower bound; so many held entities is the news already).
    """
    places = [(GROUP_OF[role], p) for p in keys.all_partitions() for role in ROLES]
    pipe = redis.pipeline(transaction=False)
    for group, p in places:
        pipe.hkeys(keys.held(group, p))
    held: list[list[bytes]] = await pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for (group, p), entities in zip(places, held, strict=True):
        for entity in entities[:PARKED_LIMIT]:
            pipe.llen(keys.parked(group, _text(entity), p))
    lengths: list[int] = await pipe.execute() if any(held) else []
    found, start = {}, 0
    for (group, p), entities in zip(places, held, strict=True):
        counted = min(len(entities), PARKED_LIMIT)
        found[group, p] = (len(entities), sum(lengths[start : start + counted]))
        start += counted
    return found


class _Reader:
    """The per-stream and per-group reads of one report, at one server time."""

    def __init__(self, redis: RedisClient, *, now_ms: int, scan_limit: int) -> None:
        self._redis = redis
        self._now_ms = now_ms
        self._limit = scan_limit
        self._count = redis.register_script(_COUNT_RANGE)

    async def stream(self, stream: str, expected_group: str) -> list[GroupLag]:
        """Every group of ``stream``, and ``expected_group`` even when it is missing."""
        try:
            infos: list[dict[str, Any]] = await self._redis.xinfo_groups(stream)
        except redis_errors.ResponseError as e:
            if "no such key" not in str(e):
                raise
            return [_empty(stream, expected_group)]
        length: int = await self._redis.xlen(stream)
        found = [await self._group(stream, length, info) for info in infos]
        if expected_group not in {g.group for g in found}:
            found.append(await self._missing_group(stream, expected_group, length))
        expected = [g for g in found if g.group == expected_group]
        return expected + sorted((g for g in found if g.group != expected_group), key=_name)

    async def _group(self, stream: str, length: int, info: dict[str, Any]) -> GroupLag:
        name = _text(info["name"])
        last = _text(info["last-delivered-id"])
        lag, lag_valid, first_after = await self._lag(stream, length, last, info)
        oldest_pending: str | None = None
        if info["pending"]:
            summary = await self._redis.xpending(stream, name)
            oldest_pending = _text(summary["min"]) if summary["min"] else None
        rows = await self._redis.xinfo_consumers(stream, name)
        return GroupLag(
            stream=stream,
            group=name,
            length=length,
            lag=lag,
            lag_valid=lag_valid,
            pending=int(info["pending"]),
            oldest_pending_age_s=self._age(oldest_pending),
            oldest_undelivered_age_s=self._age(first_after),
            consumers=[_consumer(row) for row in rows],
        )

    async def _lag(
        self, stream: str, length: int, last: str, info: dict[str, Any]
    ) -> tuple[int, bool, str | None]:
        """(lag, exact, id of the first undelivered entry) of one group."""
        after = f"({last}"
        reported = info.get("lag")  # absent before Redis 7; None when Redis cannot tell
        if reported is not None:
            if not reported:
                return 0, True, None
            first: Any = await self._redis.xrange(stream, min=after, count=1)
            return int(reported), True, _text(first[0][0]) if first else None
        counted, first_after = await self._count_range(stream, after, "+")
        if counted < self._limit:
            return counted, True, first_after
        # Too many to count after the group: count those up to it instead.
        delivered, _ = await self._count_range(stream, "-", last)
        if delivered < self._limit:
            return length - delivered, True, first_after
        # At least `limit` entries on each side: estimate. Redis 7's counters over-count
        # deleted entries; without them, the most the lag can be.
        estimate = length - self._limit
        entries_read = info.get("entries-read")
        if entries_read is not None:
            stream_info = await self._redis.xinfo_stream(stream)
            added = stream_info.get("entries-added")
            if added is not None:
                estimate = min(estimate, max(self._limit, int(added) - int(entries_read)))
        return estimate, False, first_after

    async def _count_range(self, stream: str, start: str, end: str) -> tuple[int, str | None]:
        counted, first = await self._count(keys=[stream], args=[start, end, self._limit])
        return int(counted), _text(first) if first else None

    async def _missing_group(self, stream: str, group: str, length: int) -> GroupLag:
        first: Any = await self._redis.xrange(stream, count=1)
        return GroupLag(
            stream=stream,
            group=group,
            length=length,
            lag=length,
            lag_valid=True,
            pending=0,
            oldest_pending_age_s=None,
            oldest_undelivered_age_s=self._age(_text(first[0][0]) if first else None),
        )

    def _age(self, entry_id: str | None) -> float | None:
        """Seconds since the entry was added, by the ms part of its id."""
        if entry_id is None:
            return None
        return max(0, self._now_ms - int(entry_id.partition("-")[0])) / 1000


def _empty(stream: str, group: str) -> GroupLag:
    return GroupLag(
        stream=stream,
        group=group,
        length=0,
        lag=0,
        lag_valid=True,
        pending=0,
        oldest_pending_age_s=None,
        oldest_undelivered_age_s=None,
    )


def _consumer(row: dict[str, Any]) -> ConsumerLag:
    inactive = row.get("inactive")  # Redis 7.2+; -1 for a consumer that never read
    return ConsumerLag(
        name=_text(row["name"]),
        pending=int(row["pending"]),
        idle_s=int(row["idle"]) / 1000,
        inactive_s=int(inactive) / 1000 if inactive is not None and inactive >= 0 else None,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _name(group: GroupLag) -> str:
    return group.group


# Prometheus ---------------------------------------------------------------------------

_exported: set[tuple[str, str]] = set()
_GROUP_GAUGES = (
    metrics.GROUP_LAG,
    metrics.GROUP_LAG_VALID,
    metrics.GROUP_PENDING,
    metrics.GROUP_OLDEST_PENDING_AGE,
    metrics.GROUP_OLDEST_UNDELIVERED_AGE,
    metrics.GROUP_PARKED,
)


def export_gauges(report: LagReport) -> None:
    """Set the lag gauges from a report; a group that is gone loses its series."""
    current = set()
    for g in report.groups:
        labels = (g.stream, g.group)
        current.add(labels)
        metrics.STREAM_LENGTH.labels(g.stream).set(g.length)
        metrics.GROUP_LAG.labels(*labels).set(g.lag)
        metrics.GROUP_LAG_VALID.labels(*labels).set(1 if g.lag_valid else 0)
        metrics.GROUP_PENDING.labels(*labels).set(g.pending)
        metrics.GROUP_OLDEST_PENDING_AGE.labels(*labels).set(g.oldest_pending_age_s or 0.0)
        metrics.GROUP_OLDEST_UNDELIVERED_AGE.labels(*labels).set(g.oldest_undelivered_age_s or 0.0)
        metrics.GROUP_PARKED.labels(*labels).set(g.parked)
    for labels in _exported - current:
        for gauge in _GROUP_GAUGES:
            gauge.remove(*labels)
    _exported.clear()
    _exported.update(current)
    metrics.RETRY_SCHEDULED.set(report.retry_scheduled)
    metrics.DEAD_LETTERS_OPEN.set(report.dead_letters)
    if report.outbox is not None:
        producer_metrics.OUTBOX_WAITING.set(report.outbox.waiting)
        producer_metrics.OUTBOX_OLDEST_AGE.set(report.outbox.oldest_age_s or 0.0)
        metrics.OVERDUE.labels("execution").set(report.overdue)
        metrics.OVERDUE.labels("outbox").set(report.outbox.overdue)
        metrics.WAITING.set(report.waiting)
        metrics.TIMERS_DUE.set(report.timers_due)
        metrics.APPROVALS_PENDING.set(report.approvals_pending)
        metrics.TASKS_OPEN.set(report.tasks_open)


class LagGauges:
    """A worker service: refresh the lag gauges every ``every_s`` until stopped."""

    def __init__(
        self,
        redis: RedisClient,
        pool: AsyncConnectionPool[Any] | None,
        keys: Keys,
        every_s: float = REFRESH_S,
        overdue_after_s: float = OVERDUE_AFTER_S,
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._every_s = every_s
        self._overdue_after_s = overdue_after_s
        self._stopped = anyio.Event()

    def stop(self) -> None:
        """Stop after the current refresh."""
        self._stopped.set()

    async def run(self) -> None:
        """Refresh until stopped; a failed refresh keeps the last values."""
        await run_every(self._every_s, self._refresh, self._stopped)

    async def _refresh(self) -> None:
        try:
            report = await read_lag(
                self._redis, self._pool, self._keys, overdue_after_s=self._overdue_after_s
            )
            export_gauges(report)
        except Exception as e:  # noqa: BLE001 - metrics must never stop the workers
            log.warning("lag.refresh_failed", error=f"{type(e).__name__}: {e}")
