"""The workers of a deployment, live and gone, as their heartbeats describe them.

Every worker process writes a hash, ``{prefix}:heartbeat:{id}``, every
``GOVFLOW_HEARTBEAT_INTERVAL`` seconds (``runtime.heartbeat``): what it runs and holds,
when it started, when it beat and when one of its consumers last made progress, all on
the Redis server's clock. Its id is scored in ``{prefix}:heartbeats`` by the time of its
last beat. Both last ``GONE_KEPT_S`` after that beat, so a worker that is gone stays
listed for as long.

At the reader's "now" (the Redis server's clock too), a worker is

- ``live``: it beat within ``STALE_BEATS`` intervals and a consumer of its made progress
  within its ``GOVFLOW_STALL_AFTER``;
- ``stalled``: it beats, but none of its consumers made progress for that long;
- ``stale``: no beat for ``STALE_BEATS`` intervals: killed, frozen, or cut off from Redis;
- ``stopped``: it said so on its way out (SIGTERM).

Live and stalled workers hold their consumers (``live``); stale and stopped ones are gone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from govflow.consumers.streams import RedisClient
from govflow.schemas.keys import Keys

GONE_KEPT_S = 900.0  # a worker is listed this long after its last beat
STALE_BEATS = 4  # intervals without a beat before a worker is stale

ROLES = ("triggers", "actions", "relay")  # what `govflow run --role` takes
State = Literal["live", "stalled", "stale", "stopped"]
STATES: tuple[State, ...] = ("live", "stalled", "stale", "stopped")


class ConsumerRef(msgspec.Struct, frozen=True):
    """A consumer a worker runs: its stream, its group and its name in the group."""

    stream: str
    group: str
    name: str


class WorkerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker writes about itself: one field of its heartbeat hash each.

    Times are Unix seconds on the Redis server's clock.
    """

    id: str
    host: str
    pid: int
    roles: list[str]
    consumers: list[ConsumerRef]
    partitions: dict[str, list[int]]  # per group, the partitions it leases (none with one)
    started_at: float
    beat_at: float
    last_progress_at: float
    beat_every_s: float
    stall_after_s: float
    stopped_at: float | None = None


class WorkerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One worker as ``govflow lag``, ``GET /workers`` and the dashboard show it."""

    id: str
    host: str
    pid: int
    roles: list[str]
    state: State
    live: bool  # live or stalled: its consumers are its own
    started_at: datetime
    heartbeat_age_s: float
    progress_age_s: float
    consumers: list[ConsumerRef]
    partitions: dict[str, list[int]]
    stopped_at: datetime | None = None


FIELDS: tuple[str, ...] = WorkerRecord.__struct_fields__
_JSON_FIELDS = frozenset({"roles", "consumers", "partitions"})
_REQUIRED = frozenset(FIELDS) - {"stopped_at"}


def encode_record(record: WorkerRecord) -> dict[str, str]:
    """The hash fields of a record: numbers as text, lists and maps as JSON."""
    fields: dict[str, str] = {}
    for name in FIELDS:
        value = getattr(record, name)
        if value is None:
            continue
        fields[name] = msgspec.json.encode(value).decode() if name in _JSON_FIELDS else str(value)
    return fields


def decode_record(values: list[bytes | None]) -> WorkerRecord | None:
    """The record of an ``HMGET`` of ``FIELDS``; None for a hash that is gone or torn."""
    raw = {name: v.decode() for name, v in zip(FIELDS, values, strict=True) if v is not None}
    if not _REQUIRED <= raw.keys():
        return None  # expired between the index and the hash, or not written by govflow
    try:
        parsed: dict[str, object] = {
            name: msgspec.json.decode(v) if name in _JSON_FIELDS else v for name, v in raw.items()
        }
        return msgspec.convert(parsed, WorkerRecord, strict=False)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def judge(record: WorkerRecord, now_s: float) -> State:
    """The state of a worker at ``now_s`` (the Redis server's clock)."""
    if record.stopped_at is not None:
        return "stopped"
    if now_s - record.beat_at > STALE_BEATS * record.beat_every_s:
        return "stale"
    if now_s - record.last_progress_at > record.stall_after_s:
        return "stalled"
    return "live"


def status_of(record: WorkerRecord, now_s: float) -> WorkerStatus:
    """How a worker looks at ``now_s``."""
    state = judge(record, now_s)
    return WorkerStatus(
        id=record.id,
        host=record.host,
        pid=record.pid,
        roles=record.roles,
        state=state,
        live=state in ("live", "stalled"),
        started_at=_when(record.started_at),
        heartbeat_age_s=round(max(0.0, now_s - record.beat_at), 3),
        progress_age_s=round(max(0.0, now_s - record.last_progress_at), 3),
        consumers=record.consumers,
        partitions=record.partitions,
        stopped_at=None if record.stopped_at is None else _when(record.stopped_at),
    )


async def server_now(redis: RedisClient) -> float:
    """The Redis server's clock, in Unix seconds."""
    seconds, micros = await redis.time()
    return seconds + micros / 1_000_000


async def read_workers(
    redis: RedisClient, keys: Keys, now_s: float | None = None
) -> list[WorkerStatus]:
    """Every worker listed: live ones first, then gone ones, each newest first.

    Args:
        redis: a client with ``decode_responses=False``.
        keys: the deployment's key names.
        now_s: the Redis server's clock, when the caller read it already.
    """
    now_s = await server_now(redis) if now_s is None else now_s
    ids: Any = await redis.zrange(keys.heartbeats(), 0, -1)  # bytes, newest beat last
    if not ids:
        return []
    pipe = redis.pipeline(transaction=False)  # one key a call: fine on a cluster
    for worker_id in ids:
        pipe.hmget(keys.heartbeat(worker_id.decode()), list(FIELDS))
    rows: list[list[bytes | None]] = await pipe.execute()
    found = [status_of(r, now_s) for r in map(decode_record, rows) if r is not None]
    return sorted(found, key=lambda w: (not w.live, -w.started_at.timestamp(), w.id))


def _when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
