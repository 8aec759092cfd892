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

Consumers are shown by their workers' heartbeats (``operations.workers``): every consumer
a live worker runs, before its first entry too (Redis lists a consumer only once it was
delivered one), and a consumer no live worker runs only while entries are pending for
it, until another consumer claims them. The workers themselves, live and gone, are the
report's ``workers``.

This module reads Redis replies itself (``XINFO`` is read nowhere on the hot path); the
Prometheus gauges come from a report read once per scrape of ``govflow serve``
(``operations.lag_metrics``). The ``govflow lag`` command is in govflow/cli/lag.py.
"""

from __future__ import annotations

from typing import Any

import msgspec
from psycopg_pool import AsyncConnectionPool
from redis import exceptions as redis_errors

from govflow.consumers.pause import Pause, read_pauses
from govflow.consumers.streams import RedisClient
from govflow.db import dead_letters, decisions, outbox, reconcile
from govflow.operations.workers import WorkerStatus, read_workers
from govflow.schemas.keys import GROUP_OF, Keys, Role

# Entries counted per side of a group's last-delivered id before the lag becomes an
# estimate. Counting runs inside Redis (no payload crosses the network) at roughly a
# millisecond per thousand entries, and blocks the server meanwhile.
SCAN_LIMIT = 10_000
PARKED_LIMIT = 1_000  # held entities whose parked entries are counted, per group and partition
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
    # Since its last attempted interaction (read, claim, ack); for a consumer Redis does
    # not list yet, since its worker last made progress.
    idle_s: float
    inactive_s: float | None = None  # since its last successful one; Redis 7.2+ only
    live: bool  # a live worker's heartbeat names it
    worker: str | None = None  # that worker's id


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
    workers: list[WorkerStatus] = []  # live first, then gone (``operations.workers``)


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
    workers = await read_workers(redis, keys, now_s=seconds + micros / 1_000_000)
    reader = _Reader(
        redis,
        now_ms=seconds * 1000 + micros // 1000,
        scan_limit=scan_limit,
        running=_running(workers),
    )
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
        workers=workers,
    )


# Per (stream, group), the consumers live workers run: name -> (worker id, progress age).
Running = dict[tuple[str, str], dict[str, tuple[str, float]]]


def _running(workers: list[WorkerStatus]) -> Running:
    running: Running = {}
    for w in workers:
        if w.live:
            for c in w.consumers:
                running.setdefault((c.stream, c.group), {})[c.name] = (w.id, w.progress_age_s)
    return running


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

    def __init__(
        self, redis: RedisClient, *, now_ms: int, scan_limit: int, running: Running
    ) -> None:
        self._redis = redis
        self._now_ms = now_ms
        self._limit = scan_limit
        self._running = running
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
            consumers=_consumers(rows, self._running.get((stream, name), {})),
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


def _consumers(
    rows: list[dict[str, Any]], running: dict[str, tuple[str, float]]
) -> list[ConsumerLag]:
    """The consumers live workers run, and those that no live worker runs but that hold
    pending entries (a claim will take them over), by name."""
    listed = {_text(row["name"]): row for row in rows}
    shown = []
    for name in sorted(listed.keys() | running.keys()):
        worker, progress_age_s = running.get(name, (None, 0.0))
        row = listed.get(name)
        if row is None:  # not delivered anything yet: Redis does not list it
            shown.append(
                ConsumerLag(name=name, pending=0, idle_s=progress_age_s, live=True, worker=worker)
            )
        elif worker is not None or int(row["pending"]):
            shown.append(_consumer(row, worker))
    return shown


def _consumer(row: dict[str, Any], worker: str | None) -> ConsumerLag:
    inactive = row.get("inactive")  # Redis 7.2+; -1 for a consumer that never read
    return ConsumerLag(
        name=_text(row["name"]),
        pending=int(row["pending"]),
        idle_s=int(row["idle"]) / 1000,
        inactive_s=int(inactive) / 1000 if inactive is not None and inactive >= 0 else None,
        live=worker is not None,
        worker=worker,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _name(group: GroupLag) -> str:
    return group.group
