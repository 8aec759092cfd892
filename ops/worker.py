"""``govflow run``: every role's workers in one process, stopped gracefully.

One ``GroupConsumer`` per (role, partition, concurrency slot), all sharing one Redis
client, one Postgres pool and one webhook client; plus the retry mover, the janitor and,
with the ``relay`` role, the outbox relay.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterable
from typing import Any, Protocol

import anyio
import structlog
from anyio.abc import TaskStatus
from redis.asyncio import Redis

from consumers import webhook
from consumers.actions import ActionRunner
from consumers.definitions import Definitions
from consumers.janitor import Janitor
from consumers.loop import BLOCK_MS, GroupConsumer, Handler
from consumers.outcomes import RetryPolicy
from consumers.retry import RetryMover
from consumers.streams import Streams
from consumers.triggers import TriggerMatcher
from db.pool import open_pool
from schemas.errors import ConfigError
from schemas.keys import Keys
from schemas.settings import Settings

log = structlog.get_logger(__name__)

ROLES = frozenset({"triggers", "actions", "relay"})


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


def redis_client(url: str) -> Redis:
    """A client whose socket timeout stays above the blocking read's."""
    return Redis.from_url(
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
        self.keys = Keys(settings.prefix, settings.partitions)
        self._services: list[Service] = []
        self._stop = anyio.Event()

    def stop(self) -> None:
        """Stop taking work; what is in hand finishes within the grace period."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until ``stop()``; signals readiness once every consumer is started."""
        assert self.settings.redis_url is not None
        assert self.settings.database_url is not None
        redis = redis_client(self.settings.redis_url)
        pool = await open_pool(self.settings.database_url, max_size=2 * self.concurrency + 4)
        try:
            async with webhook.client(self.settings.webhook_timeout) as http:
                self._services = self._build(redis, pool, http)
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        for service in self._services:
                            tg.start_soon(service.run)
                        log.info(
                            "worker.started", roles=sorted(self.roles), concurrency=self.concurrency
                        )
                        task_status.started()
                        await self._stop.wait()
                        log.info("worker.stopping", grace_s=self.settings.shutdown_grace)
                        for service in self._services:
                            service.stop()
                        scope.deadline = anyio.current_time() + self.settings.shutdown_grace
        finally:
            with anyio.CancelScope(shield=True):
                await pool.close()
                await redis.aclose()
            log.info("worker.stopped")

    def _build(self, redis: Redis, pool: Any, http: Any) -> list[Service]:
        settings, keys = self.settings, self.keys
        streams = Streams(redis)
        definitions = Definitions(pool)
        policy = RetryPolicy(settings.max_attempts, settings.backoff_base)
        handlers: list[Handler] = []
        if "triggers" in self.roles:
            handlers.append(TriggerMatcher(redis, pool, keys, definitions))
        if "actions" in self.roles:
            handlers.append(ActionRunner(pool, definitions, policy, settings, http))
        name = f"{socket.gethostname()}-{os.getpid()}"
        services: list[Service] = [
            GroupConsumer(
                streams=streams, pool=pool, keys=keys, partition=p, handler=h,
                consumer=f"{name}-{i}", policy=policy,
                batch_size=settings.batch_size, claim_idle_s=settings.claim_idle,
            )
            for h in handlers
            for p in keys.all_partitions()
            for i in range(self.concurrency)
        ]  # fmt: skip
        if handlers:
            services.append(RetryMover(streams, keys))
            services.append(
                Janitor(
                    streams,
                    keys,
                    retention=settings.retention,
                    consumer_gc_s=max(300.0, 10 * settings.claim_idle),
                )
            )
        if "relay" in self.roles:
            from producers.relay import Relay

            services.append(Relay(redis, pool, keys))
        return services


async def run_workers(
    settings: Settings, roles: frozenset[str], concurrency: int = 1, metrics_port: int | None = None
) -> None:
    """Run the workers until SIGTERM or SIGINT, then finish the work in hand and return."""
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1")
    worker = Worker(settings, roles, concurrency)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                worker.stop()
                break
