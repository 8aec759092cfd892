"""``govflow run``: every role's workers in one process, stopped gracefully.

With one partition (the default): one ``GroupConsumer`` per (role, concurrency slot), all
sharing one Redis client, one Postgres pool and the HTTP clients (``Clients``); plus the
retry mover, the janitor, the reconciler and the retention sweep (with the ``triggers`` or
``actions`` role), the deadline service (with the ``actions`` role) and, with the ``relay``
role, the outbox relay. From the moment Redis answers until every service has returned,
the worker writes its heartbeat (``runtime.heartbeat``).

With ``GOVFLOW_PARTITIONS`` above 1, partitions are leased (``consumers.partitions``): per
role, the worker holds a fair share of the partitions, one consumer on each, and
``--concurrency`` does not apply; the retry mover and the janitor tend the partitions
held here. The Redis URL may name a Redis Cluster node (``govflow.core.connect``); a cluster
needs at least 2 partitions, since one partition's keys carry no hash tag.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar, cast

import anyio
import structlog
from anyio.abc import TaskStatus
from prometheus_client import start_http_server
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from govflow.consumers.actions import ActionRunner, Clients, open_clients
from govflow.consumers.deadlines import Deadlines
from govflow.consumers.definitions import Definitions
from govflow.consumers.janitor import Janitor
from govflow.consumers.loop import GroupConsumer, Handler
from govflow.consumers.ordering import Ordering
from govflow.consumers.outcomes import RetryPolicy
from govflow.consumers.partitions import PartitionLease, PartitionLeases
from govflow.consumers.reconcile import Reconciler
from govflow.consumers.retention import Retention
from govflow.consumers.retry import RetryMover
from govflow.consumers.seal import Seal
from govflow.consumers.streams import BLOCK_MS, RedisClient, Streams, load_seal
from govflow.consumers.triggers import TriggerMatcher
from govflow.core import deployment
from govflow.core.connect import connect
from govflow.core.health import PostgresHealth
from govflow.core.pool_metrics import POOLS
from govflow.core.progress import Progress
from govflow.core.unavailable import GaveUpError, until_available
from govflow.db.pool import open_pool
from govflow.operations import workers
from govflow.operations.workers import ConsumerRef
from govflow.producers.relay import Relay
from govflow.runtime.heartbeat import Heartbeat, Holdings, worker_id
from govflow.schemas.errors import ConfigError, UnavailableError
from govflow.schemas.keys import GROUP_OF, Role
from govflow.schemas.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")

ROLES = frozenset(workers.ROLES)
ROLE_OF: dict[str, Role] = {group: role for role, group in GROUP_OF.items()}


class Service(Protocol):
    """Something the worker runs until it is told to stop."""

    async def run(self) -> None:
        """Work until ``stop()``."""
        ...

    def stop(self) -> None:
        """Finish what is in hand and return from ``run()``."""
        ...


def parse_roles(values: Iterable[str]) -> frozenset[str]:
    """``all`` or any of triggers, actions, relay (repeated or comma-separated).

    Raises:
        ConfigError: an unknown role.
    """
    roles = {r.strip() for v in values for r in v.split(",") if r.strip()} or {"all"}
    if "all" in roles:
        return ROLES
    unknown = roles - ROLES
    if unknown:
        raise ConfigError(
            f"unknown role {', '.join(sorted(unknown))}: use all, triggers, actions or relay"
        )
    return frozenset(roles)


async def redis_client(url: str) -> RedisClient:
    """A client whose socket timeout stays above the blocking read's (a cluster's too)."""
    return await connect(
        url,
        socket_timeout=BLOCK_MS / 1000 + 10,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry_on_timeout=False,
    )


class Worker:
    """The workers of some roles, with an explicit ``stop()`` (Temporal's shape)."""

    def __init__(self, settings: Settings, roles: frozenset[str], concurrency: int = 1) -> None:
        if settings.redis_url is None or settings.database_url is None:
            raise ConfigError("the worker needs both a Redis URL and a database URL")
        self.settings = settings
        self.roles = roles
        self.concurrency = concurrency
        self.keys = settings.keys()
        self.id = worker_id()
        self.progress = Progress()
        self._services: list[Service] = []
        self._stop = anyio.Event()
        self._waiting = anyio.CancelScope()  # start-up's wait for a server, if any

    def stop(self) -> None:
        """Stop taking work; what is in hand finishes within the grace period."""
        self._stop.set()
        self._waiting.cancel()

    @property
    def leases(self) -> list[PartitionLeases]:
        """The partition leases of each group (none with one partition)."""
        return [s for s in self._services if isinstance(s, PartitionLeases)]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until ``stop()``; signals readiness once every consumer is started.

        The heartbeat starts as soon as Redis answers, so a worker waiting for Postgres
        is seen waiting; it beats until every service has returned, then says it stopped.
        """
        url = self.settings.redis_url
        assert url is not None
        redis = await self._while_away("connect to Redis", lambda: redis_client(url))
        if redis is None:
            return  # stopped before Redis answered
        try:
            if isinstance(redis, RedisCluster) and self.keys.partitions == 1:
                raise ConfigError(
                    "the Redis URL names a Redis Cluster: set GOVFLOW_PARTITIONS >= 2 (one "
                    "partition's keys have no hash tag, so they cannot share a slot)"
                )
            heartbeat = Heartbeat(
                redis, self.keys, worker=self.id, roles=self.roles, holdings=self.holdings,
                progress=self.progress, every_s=self.settings.heartbeat_interval,
                stall_after_s=self.settings.stall_after,
            )  # fmt: skip
            error: Exception | None = None
            async with anyio.create_task_group() as beating:
                beating.start_soon(heartbeat.run)
                try:
                    await self._run_with(redis, heartbeat, task_status)
                except Exception as e:  # noqa: BLE001 - raised below, unwrapped by the task group
                    error = e
                finally:
                    heartbeat.stop()
            if error is not None:
                raise error
        finally:
            with anyio.CancelScope(shield=True):
                await redis.aclose()
            log.info("worker.stopped")

    async def _run_with(
        self, redis: RedisClient, heartbeat: Heartbeat, task_status: TaskStatus[None]
    ) -> None:
        """Open the pool, start every service, and stop them on ``stop()``."""
        url = self.settings.database_url
        assert url is not None
        size = self._pool_size()
        pool = await self._while_away("open the pool", lambda: open_pool(url, max_size=size))
        if pool is None:
            return  # stopped before Postgres answered
        POOLS.watch("worker", pool)
        try:
            seal = await self._while_away("check the deployment", lambda: self._check(redis, pool))
            if seal is None:
                return  # stopped while a server was away
            async with open_clients(
                self.settings.webhook_timeout,
                self.settings.allowed_hosts(),
                self.settings.io_concurrency,
            ) as clients:
                self._services = self._build(redis, pool, clients, seal)
                # What start-up made (modules, definitions, clients) lives as long as the
                # worker: kept out of the collector's full passes, each pass looks at the
                # work's own objects only (a pass over everything paused the worker 40 ms).
                gc.freeze()
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        for service in self._services:
                            tg.start_soon(service.run)
                        tg.start_soon(heartbeat.beat)  # say what runs now, not at the next beat
                        log.info(
                            "worker.started",
                            worker=self.id,
                            roles=sorted(self.roles),
                            concurrency=self.concurrency,
                        )
                        task_status.started()
                        await self._stop.wait()
                        log.info("worker.stopping", grace_s=self.settings.shutdown_grace)
                        for service in self._services:
                            service.stop()
                        scope.deadline = anyio.current_time() + self.settings.shutdown_grace
        finally:
            POOLS.unwatch(pool)
            with anyio.CancelScope(shield=True):
                await pool.close()

    def holdings(self) -> Holdings:
        """The consumers running now, and the partitions leased (for the heartbeat)."""
        consumers = [
            ConsumerRef(s.stream, s.group, s.consumer)
            for s in self._services
            if isinstance(s, GroupConsumer)
        ]
        partitions: dict[str, list[int]] = {}
        for leases in self.leases:
            held = sorted(leases.owned())
            partitions[leases.group] = held
            role = ROLE_OF[leases.group]
            consumers += [
                ConsumerRef(self.keys.stream(role, p), leases.group, self.id) for p in held
            ]
        return Holdings(consumers=consumers, partitions=partitions)

    async def _while_away(self, step: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call()``, tried again after a back-off while a server is unavailable.

        Start-up waits for the servers however long they are away, and whichever goes away
        at whatever point of it (a Redis restarted between the connection and the checks);
        None when ``stop()`` comes first (it cancels the wait, or the call in flight).
        """
        if self._stop.is_set():
            return None
        self._waiting = anyio.CancelScope()
        with self._waiting, contextlib.suppress(GaveUpError):
            return await until_available(call, stopping=self._stop.is_set, step=step)
        return None

    def _pool_size(self) -> int:
        """A connection for every consumer that may hold one, and a few for the services.

        With partitions a worker runs one consumer per partition it holds, up to all of
        them when it is alone, whatever ``--concurrency`` says.
        """
        consumers_per_role = self.concurrency if self.keys.partitions == 1 else self.keys.partitions
        return 2 * consumers_per_role + 4

    async def _check(self, redis: RedisClient, pool: AsyncConnectionPool[Any]) -> Seal:
        """Settings that must agree across the deployment (``core.deployment``), and its seal.

        Raises:
            UnavailableError: Redis lost the seal as it was made (restarted without its data).
        """
        await deployment.check_worker(redis, pool, self.keys)
        seal = await load_seal(redis, self.keys)
        if seal is None:
            raise UnavailableError("Redis lost the deployment's seal as it was made")
        return seal

    def _build(
        self, redis: RedisClient, pool: Any, clients: Clients, seal: Seal | None
    ) -> list[Service]:
        settings, keys = self.settings, self.keys
        streams = Streams(redis, seal)
        definitions = Definitions(pool)
        policy = RetryPolicy(settings.max_attempts, settings.backoff_base, settings.backoff_max)
        handlers: list[Handler] = []
        if "triggers" in self.roles:
            handlers.append(
                TriggerMatcher(
                    streams,
                    pool,
                    keys,
                    definitions,
                    settings.reconcile_after,
                    max_chain_executions=settings.max_chain_executions,
                )
            )
        if "actions" in self.roles:
            handlers.append(ActionRunner(pool, definitions, policy, settings, clients))
        ordering = Ordering(definitions, streams, keys)
        name = f"{socket.gethostname()}-{os.getpid()}"
        services: list[Service] = []
        leases: list[PartitionLeases] = []
        if keys.partitions == 1:
            services += [
                GroupConsumer(
                    streams=streams, pool=pool, keys=keys, partition=0, handler=h,
                    consumer=f"{name}-{i}", policy=policy, ordering=ordering,
                    batch_size=settings.batch_size, claim_idle_s=settings.claim_idle,
                    hold_max_s=settings.hold_max, progress=self.progress,
                )
                for h in handlers
                for i in range(self.concurrency)
            ]  # fmt: skip
        else:
            # Postgres out of reach for longer than a lease: give the partitions up.
            health = PostgresHealth(pool, interval=settings.lease_ttl / 3)
            services.append(health)

            def consumer_of(handler: Handler) -> Callable[[int, PartitionLease], GroupConsumer]:
                return lambda p, lease: GroupConsumer(
                    streams=streams, pool=pool, keys=keys, partition=p, handler=handler,
                    consumer=self.id, policy=policy, ordering=ordering, lease=lease,
                    batch_size=settings.batch_size, claim_idle_s=settings.claim_idle,
                    hold_max_s=settings.hold_max, progress=self.progress,
                )  # fmt: skip

            leases = [
                PartitionLeases(
                    redis,
                    keys,
                    GROUP_OF[h.role],
                    self.id,
                    settings.lease_ttl,
                    consumer_of(h),
                    healthy=lambda: health.reached_within(settings.lease_ttl),
                )
                for h in handlers
            ]
            services += leases
        held = (lambda: sorted(set().union(*(x.owned() for x in leases)))) if leases else None
        if handlers:
            services.append(RetryMover(streams, keys, partitions=held))
            services.append(
                Janitor(
                    streams,
                    keys,
                    retention=settings.retention,
                    consumer_gc_s=max(300.0, 10 * settings.claim_idle),
                    partitions=held,
                )
            )
            # Every worker of a stream role sweeps for lost work; a Postgres lock taken per
            # sweep makes one of them the leader of that sweep.
            services.append(Reconciler(streams, pool, keys, after_s=settings.reconcile_after))
            # Likewise one retention sweep at a time: old executions, the dead-letter stream.
            services.append(Retention(redis, pool, keys, settings.execution_retention_s()))
        if "actions" in self.roles:
            services.append(Deadlines(redis, pool, keys, interval=settings.deadline_interval))
        if "relay" in self.roles:
            # Typed for one server; a cluster client has the same commands.
            services.append(Relay(cast("Redis", redis), pool, keys))
        return services


# A signal again within this many seconds of the first is the same request: Ctrl-C reaches
# every process of the terminal's group, and `uv run` may pass its own copy on to govflow.
REPEAT_WINDOW_S = 1.0


async def run_workers(
    settings: Settings,
    roles: frozenset[str],
    concurrency: int = 1,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> int:
    """Run the workers until SIGTERM or SIGINT, then finish the work in hand; return 0.

    Both signals stop the same way, and are caught from the start: one that arrives while
    the worker is still connecting stops it there. Another signal, later than
    ``REPEAT_WINDOW_S`` after the first, stops at once: the work in hand is left pending
    for another worker to claim, and the status returned is 128 + that signal's number.
    """
    worker = Worker(settings, roles, concurrency)
    at_once: list[int] = []
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        if metrics_port is not None:
            try:
                start_http_server(metrics_port, addr=metrics_host)
            except OSError as e:
                raise ConfigError(
                    f"cannot serve metrics on {metrics_host}:{metrics_port}: {e.strerror or e}"
                ) from e
        async with anyio.create_task_group() as tg:

            async def stop_on_signals() -> None:
                first: float | None = None
                async for signum in signals:
                    name, now = signal.Signals(signum).name, anyio.current_time()
                    if first is None:
                        first = now
                        log.info("worker.signal", signal=name, hint="again to stop at once")
                        worker.stop()
                    elif now - first >= REPEAT_WINDOW_S:
                        log.warning("worker.stopping_at_once", signal=name)
                        at_once.append(signum)
                        tg.cancel_scope.cancel()

            tg.start_soon(stop_on_signals)
            await worker.run()
            tg.cancel_scope.cancel()
    return 128 + at_once[0] if at_once else 0
