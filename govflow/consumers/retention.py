"""Retention of what Postgres and the dead-letter stream keep, so neither grows for good.

- **Executions** (``GOVFLOW_EXECUTION_RETENTION``, off unless set): finished executions
  older than the retention are deleted with their steps and effects, and dead letters
  replayed or purged that long ago with them (``db.prune`` says what counts as finished),
  ``db.prune.BATCH`` rows per transaction. ``govflow executions prune`` does the same on
  demand.
- **The dead-letter stream** ``{prefix}:dead``: an entry there copies a dead letter the
  ``dead_letters`` table holds. Once the row is gone (pruned with its execution, above)
  the copy has served; the stream is trimmed below its oldest entry whose letter the table
  still holds, replayed and purged ones included, and never below what a consumer group
  on it (an operator's) has acknowledged.

Every worker of a stream role runs a ``Retention``; each sweep runs under a transaction
advisory lock (``LOCK_KEY``), so one worker sweeps at a time, as the reconciler does.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from typing import Any

import anyio
import msgspec
import structlog
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.janitor import next_id, parse_id, safe_trim_id
from govflow.consumers.streams import RedisClient
from govflow.core.backoff import Backoff
from govflow.core.service import run_every
from govflow.db import prune as db_prune
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)

LOCK_KEY = 0x676F76_72657465  # "gov" "rete": one retention sweep per database at a time
EVERY_S = 60.0
SWEEP_BATCHES = 20  # batches of each kind one sweep deletes at most; the next goes on
TRIM_PAGE = 500  # dead-stream entries looked up in Postgres at a time
TRIM_PAGES = 20  # pages one trim looks at, at most


class Pruned(msgspec.Struct, kw_only=True):
    """What a prune deleted (or, as a dry run, would delete now)."""

    older_than_s: float
    dry_run: bool = False
    executions: dict[str, int] = {}  # by status
    dead_letters: int = 0
    batches: int = 0  # transactions that deleted something

    @property
    def total(self) -> int:
        """Executions deleted."""
        return sum(self.executions.values())


async def prune(
    pool: AsyncConnectionPool[Any],
    older_than_s: float,
    *,
    dry_run: bool = False,
    batch: int = db_prune.BATCH,
    max_batches: int | None = None,
) -> Pruned:
    """Delete what finished ``older_than_s`` ago, a batch per transaction, until none is left
    (or ``max_batches`` of each kind)."""
    if dry_run:
        async with pool.connection() as conn:
            executions, letters = await db_prune.count(conn, older_than_s)
        return Pruned(
            older_than_s=older_than_s,
            dry_run=True,
            executions=dict(executions),
            dead_letters=letters,
        )
    done = Pruned(older_than_s=older_than_s)
    by_status: Counter[str] = Counter()
    for _ in _batches(max_batches):
        async with pool.connection() as conn, conn.transaction():
            deleted = await db_prune.delete_executions(conn, older_than_s, batch)
        by_status += deleted
        done.batches += bool(deleted)
        if deleted.total() < batch:
            break
    for _ in _batches(max_batches):
        async with pool.connection() as conn, conn.transaction():
            letters = await db_prune.delete_dead_letters(conn, older_than_s, batch)
        done.dead_letters += letters
        done.batches += bool(letters)
        if letters < batch:
            break
    done.executions = dict(by_status)
    return done


def _batches(limit: int | None) -> Iterable[int]:
    return itertools.count() if limit is None else range(limit)


async def trim_dead_stream(redis: RedisClient, pool: AsyncConnectionPool[Any], stream: str) -> int:
    """Trim ``stream`` below its oldest entry whose dead letter the table still holds;
    return how many entries went. Looks at ``TRIM_PAGES * TRIM_PAGE`` entries at most."""
    boundary: tuple[int, int] | None = None
    start = "-"
    for _ in range(TRIM_PAGES):
        page: Any = await redis.xrange(stream, min=start, count=TRIM_PAGE)
        if not page:
            break
        letters = [(entry_id, _letter_of(fields)) for entry_id, fields in page]
        async with pool.connection() as conn:
            held = await db_prune.held_letters(conn, [k for _, k in letters if k])
        first_held = next((i for i, k in letters if k in held), None)
        if first_held is not None:
            boundary = parse_id(first_held)
            break
        boundary = next_id(parse_id(page[-1][0]))
        start = f"({_text(page[-1][0])}"
    if boundary is None:
        return 0
    if await redis.xinfo_groups(stream):  # someone reads it: not beyond what they acknowledged
        safe = await safe_trim_id(redis, stream)
        boundary = min(boundary, safe) if safe is not None else boundary
    removed: int = await redis.xtrim(
        stream, minid=f"{boundary[0]}-{boundary[1]}", approximate=False
    )
    return removed


def _letter_of(fields: dict[bytes, bytes]) -> tuple[str, str] | None:
    """The (stream, message id) a dead-stream entry copies (``consumers.settle``)."""
    stream, message_id = fields.get(b"stream"), fields.get(b"message_id")
    if stream is None or message_id is None:
        return None
    return stream.decode(errors="replace"), message_id.decode(errors="replace")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Swept(msgspec.Struct, kw_only=True):
    """What one retention sweep did."""

    leader: bool = True
    pruned: Pruned | None = None  # None: execution retention is off
    trimmed: int = 0  # dead-stream entries


class Retention:
    """A worker service: prune and trim every ``every_s``, one worker at a time.

    Args:
        retention_s: how long finished executions are kept; ``None``: for good (only the
            dead-letter stream is trimmed).
    """

    def __init__(
        self,
        redis: RedisClient,
        pool: AsyncConnectionPool[Any],
        keys: Keys,
        retention_s: float | None,
        *,
        every_s: float = EVERY_S,
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._retention_s = retention_s
        self._every_s = every_s
        self._backoff = Backoff()
        self._stopped = anyio.Event()

    def stop(self) -> None:
        """Stop after the sweep in hand."""
        self._stopped.set()

    async def run(self) -> None:
        """Sweep every ``every_s`` until stopped."""
        await run_every(self._every_s, self._tick, self._stopped)

    async def _tick(self) -> float | None:
        try:
            swept = await self.sweep()
        except Exception as e:  # noqa: BLE001 - housekeeping never stops the worker
            log.warning("retention.failed", error=f"{type(e).__name__}: {e}")
            return self._backoff.next_delay()
        self._backoff.reset()
        if swept.trimmed or (swept.pruned and (swept.pruned.total or swept.pruned.dead_letters)):
            log.info("retention.swept", **msgspec.structs.asdict(swept))
        return None

    async def sweep(self) -> Swept:
        """One sweep; a worker that is not the leader does nothing."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_KEY,))
            row = await cur.fetchone()
            if row is None or not row[0]:
                return Swept(leader=False)
            swept = Swept()
            if self._retention_s is not None:
                swept.pruned = await prune(self._pool, self._retention_s, max_batches=SWEEP_BATCHES)
            for p in self._keys.all_partitions():
                swept.trimmed += await trim_dead_stream(self._redis, self._pool, self._keys.dead(p))
        return swept
