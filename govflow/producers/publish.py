"""Publish events straight to the stream, from async code or from a plain thread.

Each event becomes one entry ``XADD {prefix}:events * event <json>`` on the partition of
its entity. A lost connection or a timeout is retried a few times with exponential
backoff and jitter; then the call raises ``PublishError``. Retrying an ``XADD`` whose reply
was lost can append the event twice: harmless, because the pipeline runs each event id
once. The publisher never trims the stream: trimming below what every group has
acknowledged is the workers' job. Before its first write a publisher compares its partition
count with the one the workers recorded (``core.deployment``) and raises
``DeploymentMismatchError``, a ``ConfigError``, when they differ. With the ``otel`` extra,
each call is a producer span, and an event without a trace context leaves with that span's
(``core.tracing``).

Redis replicates asynchronously: an ``XADD`` the primary acknowledged can be lost when the
primary dies before its replica got it and the replica takes over (a Redis Cluster
failover, Sentinel). ``Publisher(..., wait_replicas=1)`` closes most of that window: after
the ``XADD`` commands it sends ``WAIT 1 <timeout>`` on the same connection (on a cluster, to
every primary it wrote to) and raises ``PublishError`` unless that many replicas
acknowledged them in time; publishing again is safe, since an event id runs once. WAIT is
not consensus: a failover can still pick a replica that had not caught up (Redis' own
caveat). What is at stake is the replication lag; across a network the window is that
network's lag, and WAIT is what closes it (measured on loopback: benchmarks/README.md,
"Waiting for a replica").
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack
from urllib.parse import urlsplit

import anyio
import msgspec
import redis
import redis.asyncio
import structlog
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from govflow.core import deployment, tracing
from govflow.core.connect import connect, split_flag, unprobed
from govflow.core.unavailable import is_unavailable
from govflow.schemas.codec import encode
from govflow.schemas.errors import PublishError
from govflow.schemas.events import Event
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)

# What a publish attempt can raise from Redis or from redis-py's cluster client.
FAILED = (redis_errors.RedisError, redis_errors.RedisClusterException)

# Connection settings of the clients ``from_url`` makes: fail fast, and leave retrying
# to the publisher's own policy rather than compounding it with redis-py's.
_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 2.0,
    "socket_timeout": 5.0,
    "retry": Retry(NoBackoff(), 0),
}


class PublishRetry(msgspec.Struct, frozen=True, kw_only=True):
    """How often, and how patiently, a publish is retried.

    The defaults make 4 attempts over about 2 seconds: 0.25 s, 0.5 s, 1 s between them.
    """

    attempts: int = 4
    initial_delay: float = 0.25
    factor: float = 2.0
    max_delay: float = 2.0
    jitter: float = 0.1  # each delay varies by up to this fraction either way

    def delays(self) -> Iterator[float]:
        """Yield the pause before each retry: ``attempts - 1`` of them."""
        delay = self.initial_delay
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_delay) * random.uniform(1 - self.jitter, 1 + self.jitter)
            delay *= self.factor


DEFAULT_RETRY = PublishRetry()


class PublisherOptions(TypedDict, total=False):
    """What ``Publisher.from_url`` and ``Publisher.connect`` pass on to the publisher."""

    retry: PublishRetry
    wait_replicas: int
    wait_timeout_ms: int


class Publisher:
    """Publish events with an async Redis client.

    Args:
        client: the connection (a ``RedisCluster`` too); a client made by ``from_url`` is
            closed by ``aclose()``.
        keys: the deployment's key names and partition count.
        retry: the retry policy on connection errors and timeouts.
        wait_replicas: after each write, wait until this many replicas have it (``WAIT``).
        wait_timeout_ms: how long to wait for them before raising ``PublishError``.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis | RedisCluster,
        keys: Keys,
        *,
        retry: PublishRetry = DEFAULT_RETRY,
        owns_client: bool = False,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self._client = client
        self._keys = keys
        self._retry = retry
        self._owns_client = owns_client
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._partitions_checked = False  # against the deployment's (core.deployment)

    @classmethod
    def from_url(cls, url: str, keys: Keys, **options: Unpack[PublisherOptions]) -> Publisher:
        """Make a publisher with its own client; close it with ``aclose()``.

        The client is a single server's unless the URL says ``?cluster=yes``; ``connect``
        asks the server instead.
        """
        return cls(unprobed(url, **_CLIENT_OPTIONS), keys, owns_client=True, **options)

    @classmethod
    async def connect(cls, url: str, keys: Keys, **options: Unpack[PublisherOptions]) -> Publisher:
        """Make a publisher with its own client of the server or cluster at ``url``.

        The server is asked whether it is a Redis Cluster node (``govflow.core.connect``).
        Close the publisher with ``aclose()``.

        Raises:
            redis.exceptions.ConnectionError: nothing answers at ``url``.
            DeploymentMismatchError: the deployment records another partition count.
        """
        publisher = cls(await connect(url, **_CLIENT_OPTIONS), keys, owns_client=True, **options)
        try:
            await publisher._check_partitions()
        except BaseException:
            await publisher.aclose()
            raise
        return publisher

    async def _check_partitions(self) -> None:
        """Compare the partition count with the deployment's, once per publisher."""
        if not self._partitions_checked:
            await deployment.check_partitions(self._client, self._keys)
            self._partitions_checked = True

    async def publish(self, event: Event) -> str:
        """Append one event to its partition's stream and return the event id.

        Raises:
            PublishError: Redis could not be reached within the retries, or refused the write.
        """
        (event_id,) = await self.publish_many([event])
        return event_id

    async def publish_many(self, events: Iterable[Event]) -> list[str]:
        """Append events in one pipeline (not a transaction); return their ids in order.

        Raises:
            PublishError: Redis could not be reached within the retries, or refused the write.
        """
        batch = list(events)
        with _publish_span(batch):
            return await self._append(tracing.stamped(batch))

    async def _append(self, batch: list[Event]) -> list[str]:
        entries = _entries(self._keys, batch)
        delays = self._retry.delays()
        for attempt in range(1, self._retry.attempts + 1):
            try:
                await self._check_partitions()
                async with self._client.pipeline(transaction=False) as pipe:
                    for stream, fields in entries:
                        pipe.xadd(stream, fields)
                    waits = self._queue_waits(pipe, [stream for stream, _ in entries])
                    replies = await pipe.execute()
            except FAILED as e:
                delay = _next_delay(e, delays)
                if delay is None:
                    raise _failure(self._client, attempt, e) from e
                log.info("publish.retrying", attempt=attempt, delay=delay, error=repr(e))
                await anyio.sleep(delay)
            else:
                self._check_replicated(replies[len(replies) - waits :])
                break
        return [event.id for event in batch]

    def _queue_waits(self, pipe: Any, streams: list[str]) -> int:
        """Queue ``WAIT`` after the writes, on each primary written to; return how many."""
        if not self._wait_replicas:
            return 0
        wait = ("WAIT", self._wait_replicas, self._wait_timeout_ms)
        if not isinstance(self._client, RedisCluster):
            pipe.execute_command(*wait)  # the same connection as the XADDs: WAIT's rule
            return 1
        nodes = {self._client.get_node_from_key(stream) for stream in streams}
        for node in nodes:
            pipe.execute_command(*wait, target_nodes=node)
        return len(nodes)

    def _check_replicated(self, acknowledged: list[int]) -> None:
        """Raise unless every ``WAIT`` saw enough replicas.

        Raises:
            PublishError: the events are on a primary, but not yet on enough replicas.
        """
        if any(n < self._wait_replicas for n in acknowledged):
            raise PublishError(
                f"the events reached {min(acknowledged)} of {self._wait_replicas} replicas "
                f"within {self._wait_timeout_ms} ms: a failover now could lose them; "
                "publish them again (an event id runs once)"
            )

    async def aclose(self) -> None:
        """Close the client if this publisher made it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class SyncPublisher:
    """Publish events with a blocking Redis client (Flask, Django, scripts).

    Args:
        client: the connection (a sync ``RedisCluster`` too); a client made by ``from_url`` is
            closed by ``close()``.
        keys: the deployment's key names and partition count.
        retry: the retry policy on connection errors and timeouts.
    """

    def __init__(
        self,
        client: redis.Redis | SyncRedisCluster,
        keys: Keys,
        *,
        retry: PublishRetry = DEFAULT_RETRY,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._keys = keys
        self._retry = retry
        self._owns_client = owns_client
        self._partitions_checked = False  # against the deployment's (core.deployment)

    @classmethod
    def from_url(
        cls, url: str, keys: Keys, *, retry: PublishRetry = DEFAULT_RETRY
    ) -> SyncPublisher:
        """Make a publisher with its own client; close it with ``close()``.

        The client is a single server's unless the URL says ``?cluster=yes``, which makes
        it redis-py's cluster client (events then spread over the partitions' shards).

        Raises:
            PublishError: a cluster URL whose nodes cannot be reached (the sync cluster
                client learns the slots when it is made).
        """
        plain_url, cluster = split_flag(url)
        if not cluster:
            client = redis.Redis.from_url(plain_url, **_CLIENT_OPTIONS)
            return cls(client, keys, retry=retry, owns_client=True)
        try:  # redis-py's sync cluster client asks the nodes for the slots at once
            cluster_client = SyncRedisCluster.from_url(plain_url, **_CLIENT_OPTIONS)
        except FAILED as e:
            host = urlsplit(plain_url)
            raise PublishError(
                f"could not reach the Redis Cluster at {host.hostname}:{host.port}: {e}"
            ) from e
        return cls(cluster_client, keys, retry=retry, owns_client=True)

    def publish(self, event: Event) -> str:
        """Append one event to its partition's stream and return the event id.

        Raises:
            PublishError: Redis could not be reached within the retries, or refused the write.
        """
        (event_id,) = self.publish_many([event])
        return event_id

    def publish_many(self, events: Iterable[Event]) -> list[str]:
        """Append events in one pipeline (not a transaction); return their ids in order.

        Raises:
            PublishError: Redis could not be reached within the retries, or refused the write.
        """
        batch = list(events)
        with _publish_span(batch):
            return self._append(tracing.stamped(batch))

    def _append(self, batch: list[Event]) -> list[str]:
        entries = _entries(self._keys, batch)
        delays = self._retry.delays()
        for attempt in range(1, self._retry.attempts + 1):
            try:
                if not self._partitions_checked:
                    deployment.check_partitions_sync(self._client, self._keys)
                    self._partitions_checked = True
                with self._client.pipeline(transaction=False) as pipe:
                    for stream, fields in entries:
                        pipe.xadd(stream, fields)
                    pipe.execute()
            except FAILED as e:
                delay = _next_delay(e, delays)
                if delay is None:
                    raise _failure(self._client, attempt, e) from e
                log.info("publish.retrying", attempt=attempt, delay=delay, error=repr(e))
                time.sleep(delay)
            else:
                break
        return [event.id for event in batch]

    def close(self) -> None:
        """Close the client if this publisher made it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _publish_span(events: list[Event]) -> AbstractContextManager[object]:
    """The producer span of a publish: events without a trace context get its context."""
    return tracing.span(
        "publish events", kind="producer", attributes=tracing.event_attributes(events)
    )


def _entries(keys: Keys, events: list[Event]) -> list[tuple[str, dict[FieldT, EncodableT]]]:
    """The (stream, fields) of each event: the wire format, one ``event`` field."""
    return [
        (keys.events(keys.partition_of(event.entity_id)), {"event": encode(event)})
        for event in events
    ]


def _next_delay(error: Exception, delays: Iterator[float]) -> float | None:
    """The pause before the next attempt, or ``None`` when this error is final."""
    if not is_unavailable(error):  # wrong credentials, a refused command: no wait fixes it
        return None
    return next(delays, None)


def _failure(
    client: redis.Redis | SyncRedisCluster | redis.asyncio.Redis | RedisCluster,
    attempts: int,
    error: Exception,
) -> PublishError:
    """A ``PublishError`` naming the server (a cluster's first node), never its password."""
    if isinstance(client, SyncRedisCluster | RedisCluster):
        kwargs: dict[str, Any] = client.get_connection_kwargs()
        node = client.get_default_node()
        where = f"{node.host}:{node.port}" if node is not None else "a Redis Cluster"
    else:
        kwargs = client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
    reason = str(error) or type(error).__name__
    if password := kwargs.get("password"):
        reason = reason.replace(str(password), "***")
    tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    return PublishError(f"could not publish to Redis at {where} after {tries}: {reason}")
