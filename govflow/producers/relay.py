"""The outbox relay: publish committed ``outbox`` rows to the event streams, in id order.

Order. A row is published only once no transaction can still commit a lower id
(``producers.frontier``): a row that commits late is held back behind, never overtaken.

Leadership. Only one relay per database publishes: the one whose dedicated connection
holds a session advisory lock (``LOCK_KEY``). The others stand by and try the lock every
``LOCK_POLL_S``; when the leader's connection dies, Postgres releases its lock and a
standby takes over within about a second. The leader selects, publishes and marks on
that same connection, so a relay that has lost its lock cannot mark anything.

A batch. ``SELECT`` the oldest unpublished rows, ``XADD`` them in one pipeline to the
partition stream of their ``entity_id`` (field ``event``: the row's JSON, compacted, as
it is: a row that is not a valid event is published anyway and the trigger matcher
dead-letters it with its reason), then ``UPDATE ... SET published_at`` the rows Redis
accepted, in one transaction. Published is not forgotten: a row is kept until the
reconciler (``consumers.reconcile``) saw its event taken up, and published again if Redis
lost it. A crash between ``XADD`` and the commit publishes those
rows again; the pipeline runs each event id once, so the copy is harmless. A row is
never marked unless its ``XADD`` succeeded.

Waking. ``LISTEN govflow_outbox`` on a connection of its own wakes the leader as soon as
a service commits (the table's trigger notifies); ``poll_s`` is the fall-back.

Failures. Redis away: the leader keeps its lock and retries the batch with backoff.
Postgres away: the relay drops its connections and starts over, with backoff. Nothing
is raised out of ``run()``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from itertools import takewhile
from typing import Any, Literal

import anyio
import msgspec
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from govflow.core.backoff import Backoff
from govflow.core.service import wait_stopped
from govflow.core.unavailable import UNAVAILABLE, is_unavailable
from govflow.producers import metrics
from govflow.producers.frontier import MAX_WAIT_S as ORDER_WAIT_S
from govflow.producers.frontier import Frontier
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)

CHANNEL = "govflow_outbox"  # notified by the outbox table's trigger (0001_init.sql)
LOCK_KEY = 0x676F76666C6F77  # "govflow" in ASCII; advisory locks are per database
LOCK_POLL_S = 1.0  # how often a standby tries the lock
APPLICATION_NAME = "govflow-relay"  # how the relay's sessions show in pg_stat_activity
DELETE_CHUNK = 10_000
EVENT_FIELD = "event"


# Each relay session tells the server to notice a vanished client: a dead leader's
# backend then exits (and its lock is released) even while it waits on a row lock or
# across a network that dropped without a FIN. Settings the server lacks are skipped.
_SESSION_SETTINGS = (
    "SELECT set_config(name, value, false) FROM (VALUES"
    " ('client_connection_check_interval', '2s'), ('tcp_keepalives_idle', '10'),"
    " ('tcp_keepalives_interval', '5'), ('tcp_keepalives_count', '3')) AS s (name, value)"
    " WHERE EXISTS (SELECT 1 FROM pg_settings p WHERE p.name = s.name)"
)
_TRY_LOCK = "SELECT pg_try_advisory_lock(%s)"
_SELECT_BATCH = (
    "SELECT id, event::text, coalesce(event ->> 'entity_id', '') FROM outbox"
    " WHERE published_at IS NULL AND id <= %s ORDER BY id LIMIT %s"
)
_MARK = "UPDATE outbox SET published_at = now() WHERE id = ANY(%s::bigint[])"
# A row goes once its event is known to have been taken up (the reconciler marks it):
# until then it is what can publish the event again should Redis lose it.
_DELETE_OLD = (
    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
    " WHERE taken_at < clock_timestamp() - make_interval(secs => %s) LIMIT %s)"
)

Row = tuple[int, str, str]  # (id, event JSON, entity_id)
State = Literal["connecting", "standby", "leading", "stopped"]


class Relay:
    """Publish the outbox to the event streams until ``stop()``; one leader at a time.

    Args:
        redis: the client to publish with (shared with the workers).
        pool: the workers' pool: the relay opens its own two connections with its
            connection settings (the backlog is `govflow lag`'s, ``operations.lag``).
        keys: the deployment's key names and partition count.
        batch_size: rows per ``SELECT`` / pipeline / ``UPDATE``.
        poll_s: the longest wait between two looks at the table when no notification
            comes.
        retention_s: rows whose event was taken up longer ago than this are deleted,
            now and then.
        order_wait_s: the longest rows wait behind an open transaction holding a lower
            id (``producers.frontier``).
    """

    def __init__(
        self,
        redis: Redis,
        pool: AsyncConnectionPool[Any],
        keys: Keys,
        *,
        batch_size: int = 500,
        poll_s: float = 1.0,
        retention_s: float = 3600.0,
        order_wait_s: float = ORDER_WAIT_S,
    ) -> None:
        if batch_size < 1 or poll_s <= 0 or retention_s < 0:
            raise ValueError("batch_size must be >= 1, poll_s > 0 and retention_s >= 0")
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._batch_size = batch_size
        self._poll_s = poll_s
        self._retention_s = retention_s
        self._cleanup_every_s = max(1.0, min(60.0, retention_s / 10))
        self._stopped = anyio.Event()
        self._wake: anyio.Event | None = None
        self.state: State = "connecting"
        self.published = 0  # rows this relay published (and marked)
        self._frontier = Frontier(order_wait_s)

    @property
    def leading(self) -> bool:
        """Whether this relay holds the lock and publishes."""
        return self.state == "leading"

    def stop(self) -> None:
        """Stop: the batch in hand is finished (or left unmarked), then ``run()`` returns."""
        self._stopped.set()
        self._wake_up()

    async def run(self) -> None:
        """Lead when the lock is free, stand by when it is not, until ``stop()``."""
        self._wake = anyio.Event()
        if self._stopped.is_set():
            return
        log.info("relay.started", batch_size=self._batch_size, poll_s=self._poll_s)
        async with anyio.create_task_group() as listening:
            listening.start_soon(self._listen)
            await self._serve()
            listening.cancel_scope.cancel()  # it only waits on its own connection
        self._set_state("stopped")
        log.info("relay.stopped", published=self.published)

    # Leadership -------------------------------------------------------------------------

    async def _serve(self) -> None:
        """Connect, win the lock, publish; start over with backoff when Postgres fails."""
        backoff = Backoff()
        while not self._stopped.is_set():
            try:
                conn = await self._connect()
            except UNAVAILABLE as e:
                if not is_unavailable(e):
                    raise
                self._failed("postgres", "relay.connect_failed", e)
                await self._sleep(backoff.next_delay())
                continue
            try:
                if await self._campaign(conn):
                    backoff.reset()
                    await self._lead(conn)
            except Exception as e:  # a bug must not stop the relay for good: log it, start over
                if is_unavailable(e) and not isinstance(e, redis_errors.RedisError):
                    self._failed("postgres", "relay.connection_lost", e, leading=self.leading)
                else:
                    metrics.RELAY_ERRORS.labels("relay").inc()
                    log.exception("relay.failed", leading=self.leading)
            else:
                continue  # stopping
            finally:
                self._set_state("connecting")
                # Closing the session releases the lock: a standby takes over.
                with anyio.CancelScope(shield=True):
                    await conn.close()
            await self._sleep(backoff.next_delay())

    async def _campaign(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Try the lock every ``LOCK_POLL_S`` until it is ours; ``False`` when stopping."""
        announced = False
        while not self._stopped.is_set():
            cur = await conn.execute(_TRY_LOCK, (LOCK_KEY,))
            row = await cur.fetchone()
            if row is not None and row[0]:
                return True
            if not announced:
                self._set_state("standby")
                log.info("relay.standby")
                announced = True
            await self._sleep(LOCK_POLL_S)
        return False

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Publish batches until ``stop()``; Redis failures are retried here, lock kept."""
        self._set_state("leading")
        log.info("relay.leading")
        backoff = Backoff()
        next_cleanup = 0.0
        while not self._stopped.is_set():
            self._wake = anyio.Event()  # a commit from now on wakes the wait below
            try:
                published = await self._publish_batch(conn)
            except redis_errors.RedisError as e:
                self._failed("redis", "relay.redis_unavailable", e)
                await self._sleep(backoff.next_delay())
                continue
            backoff.reset()
            if time.monotonic() >= next_cleanup:
                await self._delete_old(conn)
                next_cleanup = time.monotonic() + self._cleanup_every_s
            if published < self._batch_size:
                with anyio.move_on_after(self._poll_s):
                    await self._wake.wait()

    def _set_state(self, state: State) -> None:
        self.state = state
        metrics.RELAY_LEADER.set(1 if state == "leading" else 0)

    # Publishing -------------------------------------------------------------------------

    async def _publish_batch(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Publish and mark the oldest waiting rows; return how many.

        Raises:
            redis_errors.RedisError: Redis failed; the rows it accepted before the
                failure are marked, the others wait for the next try.
        """
        failure: Exception | None = None
        up_to = await self._frontier.advance(conn)
        async with conn.transaction():
            cur = await conn.execute(_SELECT_BATCH, (up_to, self._batch_size))
            rows: list[Row] = await cur.fetchall()
            if not rows:
                return 0
            results = await self._xadd(rows)
            # In order: mark rows up to the first one Redis refused, so that a later row
            # never goes out before an earlier one.
            added = sum(1 for _ in takewhile(lambda r: not isinstance(r, Exception), results))
            if added < len(rows):
                failure = results[added]
            if added:
                await conn.execute(_MARK, ([row[0] for row in rows[:added]],))
        self.published += added
        metrics.OUTBOX_PUBLISHED.inc(added)
        log.debug("relay.published", count=added, last_id=rows[added - 1][0] if added else None)
        if failure is not None:
            raise failure
        return added

    async def _xadd(self, rows: Sequence[Row]) -> list[Any]:
        """``XADD`` every row in one pipeline; a refused command comes back as its error."""
        # A relay killed between XADD and marking appends a second copy on its next try:
        # harmless, the pipeline runs an event id once (docs/REDIS.md: what newer servers
        # could do instead).
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, event, entity_id in rows:
                stream = self._keys.events(self._keys.partition_of(entity_id))
                pipe.xadd(stream, {EVENT_FIELD: _compact(event)})
            return await pipe.execute(raise_on_error=False)

    async def _delete_old(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Delete published rows older than the retention, in chunks."""
        deleted = 0
        while not self._stopped.is_set():
            cur = await conn.execute(_DELETE_OLD, (self._retention_s, DELETE_CHUNK))
            deleted += cur.rowcount
            if cur.rowcount < DELETE_CHUNK:
                break
        if deleted:
            log.info("relay.deleted_published", count=deleted, retention_s=self._retention_s)

    # Waking, metrics, plumbing -------------------------------------------------------------

    async def _listen(self) -> None:
        """Wake the publisher on every ``NOTIFY``; reconnect with backoff. Cancelled at stop."""
        backoff = Backoff()
        while True:
            try:
                conn = await self._connect()
            except UNAVAILABLE as e:
                if not is_unavailable(e):
                    raise
                log.warning("relay.listen_failed", error=str(e))
                await anyio.sleep(backoff.next_delay())
                continue
            try:
                await conn.execute(f"LISTEN {CHANNEL}")
                backoff.reset()
                self._wake_up()  # a commit may have come while we were not listening
                async for _ in conn.notifies():
                    self._wake_up()
            except Exception as e:  # noqa: BLE001 - the poll_s fall-back carries on meanwhile
                log.warning("relay.listen_failed", error=str(e) or type(e).__name__)
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.close()
            await anyio.sleep(backoff.next_delay())

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """A connection of the relay's own, to the pool's database, in autocommit."""
        conninfo: str = await _resolve(self._pool.conninfo) or ""
        kwargs: dict[str, Any] = {
            **(await _resolve(self._pool.kwargs) or {}),
            "autocommit": True,
            "application_name": APPLICATION_NAME,
            "connect_timeout": 5,
        }
        conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        try:
            await conn.execute(_SESSION_SETTINGS)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but return at once on ``stop()``."""
        await wait_stopped(self._stopped, seconds)

    def _failed(self, server: str, event: str, error: Exception, **fields: Any) -> None:
        metrics.RELAY_ERRORS.labels(server).inc()
        log.warning(event, error=str(error) or type(error).__name__, **fields)


async def _resolve(param: Any) -> Any:
    """A pool's ``conninfo`` or ``kwargs``: a value, or a sync or async callable giving it."""
    value = param() if callable(param) else param
    return await value if inspect.isawaitable(value) else value


def _compact(event: str) -> str:
    """The row's JSON without the spaces ``jsonb`` output adds; numbers kept verbatim."""
    return msgspec.json.format(event, indent=-1)
