"""The reconciler: Postgres is the record, Redis the queue; what the queue lost is put back.

Redis can lose writes it acknowledged (a crash with ``appendfsync everysec``, a failover to
a replica that lagged). Two things can then be stranded: an execution Postgres recorded
whose command no longer exists anywhere in Redis, and an outbox row the relay marked
published whose event no longer exists. Every ``interval`` seconds, one sweep:

1. Leadership: the sweep runs in one Postgres transaction that first takes a
   transaction-level advisory lock (``LOCK_KEY``); a reconciler that does not get it skips
   the sweep. No lease to renew or lose: the lock ends with the transaction.
2. Outbox: published rows whose event the trigger matcher recorded (``received_events``)
   are marked taken up; rows published longer than ``after_s`` ago and still not taken up
   are candidates (a bounded batch, locked ``SKIP LOCKED``).
3. Executions: ``queued``, ``running`` or ``retrying`` executions untouched for longer
   than ``after_s`` are candidates (a bounded batch, through the ``(status, updated_at)``
   index).
4. Traces: per partition of the candidates, one read-only Lua script looks at the entries
   not yet delivered and the pending entries of both groups, the retry set and the
   entities held for ordering. A candidate found there, or whose event is found there, or
   whose entity is held, is carried: left alone. When a place holds more entries than the
   script looks at, nothing is concluded in that partition this time.
5. Put back: each execution nothing carries is touched (``updated_at = now()``) only if its
   row is still as read (the touch is the claim: a sweep after this one finds it within
   its bound) and its command is emitted again, from the event the matcher kept; each
   row nothing carries is published again and its ``published_at`` restarted. Then commit.

A crash after the emit and before the commit emits the command again next time: the action
stage runs an execution's steps once whatever the copies. Why a trace check is sound: an
entry leaves Redis only through a hand-over that follows the Postgres commit of its
outcome (acknowledged after its transaction, retried after ``retrying`` was recorded,
dead-lettered after ``dead_lettered``), and the touch re-reads the row after the script.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
import structlog
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.streams import COMMAND_FIELD, EVENT_FIELD, Streams, TracePlace
from govflow.core import metrics
from govflow.core.backoff import Backoff
from govflow.core.service import run_every
from govflow.db import reconcile
from govflow.db.reconcile import Unfinished, Untaken
from govflow.schemas.codec import encode
from govflow.schemas.keys import GROUP_OF, Keys

log = structlog.get_logger(__name__)

LOCK_KEY = 0x676F76_7265636F  # "gov" "reco": one reconciler per database at a time
BATCH = 200  # executions, and outbox rows, looked at per sweep
SCAN_LIMIT = 2_000  # entries the trace script reads per place (stream, pending list, retries)
RECEIVED_RETENTION_S = 7 * 86_400.0  # received events kept once nothing of theirs is unfinished
FORGET_CHUNK = 1_000


class Sweep(msgspec.Struct, kw_only=True):
    """What one sweep did."""

    leader: bool = True
    executions: int = 0  # overdue executions looked at
    reemitted: int = 0  # commands emitted again
    outbox: int = 0  # overdue outbox rows looked at
    republished: int = 0  # outbox rows published again
    taken: int = 0  # outbox rows newly seen taken up
    undecided: int = 0  # partitions too full to conclude this time
    without_event: int = 0  # lost executions whose event Postgres does not hold


class Reconciler:
    """Put back the work Redis lost, one sweep every ``interval`` seconds, one leader at a time.

    Args:
        streams: the workers' stream operations.
        pool: the workers' pool (a sweep holds one connection for its transaction).
        keys: the deployment's key names (every partition is looked at).
        after_s: the bound: work untouched this long is overdue.
        interval: seconds between sweeps; by default a quarter of the bound, at most 15.
    """

    def __init__(
        self,
        streams: Streams,
        pool: AsyncConnectionPool[Any],
        keys: Keys,
        *,
        after_s: float,
        interval: float | None = None,
        batch: int = BATCH,
        scan_limit: int = SCAN_LIMIT,
    ) -> None:
        self._streams = streams
        self._pool = pool
        self._keys = keys
        self._after_s = after_s
        self._interval = interval if interval is not None else max(0.5, min(after_s / 4, 15.0))
        self._batch = batch
        self._scan_limit = scan_limit
        self._backoff = Backoff()
        self._stopped = anyio.Event()

    def stop(self) -> None:
        """Stop after the sweep in hand."""
        self._stopped.set()

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until stopped."""
        await run_every(self._interval, self._tick, self._stopped)

    async def _tick(self) -> float | None:
        try:
            done = await self.sweep()
        except Exception as e:  # noqa: BLE001 - a failed sweep is tried again; nothing is lost
            log.warning("reconcile.failed", error=f"{type(e).__name__}: {e}")
            return self._backoff.next_delay()
        self._backoff.reset()
        if done.reemitted or done.republished or done.without_event:
            log.warning("reconcile.put_back", **msgspec.structs.asdict(done))
        return None

    async def sweep(self) -> Sweep:
        """One sweep (module docstring); a reconciler that is not the leader does nothing."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_KEY,))
            row = await cur.fetchone()
            if row is None or not row[0]:
                return Sweep(leader=False)
            done = Sweep(taken=await reconcile.confirm_taken(conn, self._batch))
            rows = await reconcile.untaken_outbox(conn, self._after_s, self._batch)
            overdue = await reconcile.overdue_executions(conn, self._after_s, self._batch)
            done.outbox, done.executions = len(rows), len(overdue)
            if rows or overdue:
                lost_rows, lost = await self._untraced(rows, overdue, done)
                await self._put_back(conn, lost_rows, lost, done)
            await reconcile.forget_received(conn, RECEIVED_RETENTION_S, FORGET_CHUNK)
        metrics.RECONCILED.labels("execution").inc(done.reemitted)
        metrics.RECONCILED.labels("outbox").inc(done.republished)
        return done

    async def _untraced(
        self, rows: Sequence[Untaken], overdue: Sequence[Unfinished], done: Sweep
    ) -> tuple[list[Untaken], list[Unfinished]]:
        """The candidates nothing in Redis carries."""
        by_partition: dict[int, tuple[list[Untaken], list[Unfinished]]] = defaultdict(
            lambda: ([], [])
        )
        for r in rows:
            by_partition[self._keys.partition_of(r.entity_id)][0].append(r)
        for x in overdue:
            by_partition[self._keys.partition_of(x.entity_id)][1].append(x)
        lost_rows: list[Untaken] = []
        lost: list[Unfinished] = []
        for p, (prows, pexecs) in sorted(by_partition.items()):
            traces = await self._streams.traces(
                self._place(p),
                [x.id for x in pexecs],
                sorted({r.event_id for r in prows} | {x.event_id for x in pexecs}),
                sorted({r.entity_id for r in prows} | {x.entity_id for x in pexecs}),
                self._scan_limit,
            )
            if traces.undecided:
                done.undecided += 1
                continue
            lost_rows += [
                r
                for r in prows
                if r.event_id not in traces.events and r.entity_id not in traces.held
            ]
            lost += [
                x
                for x in pexecs
                if x.id not in traces.executions
                and x.event_id not in traces.events
                and x.entity_id not in traces.held
            ]
        return lost_rows, lost

    def _place(self, p: int) -> TracePlace:
        keys = self._keys
        events, commands = GROUP_OF["events"], GROUP_OF["commands"]
        return TracePlace(
            events=keys.events(p),
            commands=keys.commands(p),
            groups=(events, commands),
            retry=keys.retry(p),
            held=(keys.held(events, p), keys.held(commands, p)),
        )

    async def _put_back(
        self,
        conn: AsyncConnection[Any],
        rows: Sequence[Untaken],
        lost: Sequence[Unfinished],
        done: Sweep,
    ) -> None:
        """Emit the lost commands and publish the lost rows again, in one pipeline."""
        commands: list[tuple[Unfinished, bytes]] = []
        for x in lost:
            command = x.command()
            if command is None:
                done.without_event += 1
                log.error("reconcile.event_unknown", execution_id=x.id, event_id=x.event_id)
                continue
            commands.append((x, encode(command)))
        claimed = await reconcile.take_back(conn, [x for x, _ in commands])
        pipe = self._streams.redis.pipeline(transaction=False)
        for x, payload in commands:
            if x.id in claimed:
                stream = self._keys.commands(self._keys.partition_of(x.entity_id))
                pipe.xadd(stream, {COMMAND_FIELD: payload})
        for r in rows:
            pipe.xadd(
                self._keys.events(self._keys.partition_of(r.entity_id)),
                {EVENT_FIELD: msgspec.json.format(r.event, indent=-1)},
            )
        await pipe.execute()
        await reconcile.mark_republished(conn, [r.id for r in rows])
        done.reemitted, done.republished = len(claimed), len(rows)
