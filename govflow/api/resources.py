"""What the API's handlers share at run time: the settings and the connections.

``Resources`` opens one Redis client and one Postgres pool for the life of the app; the
handlers ask for it as ``gf: Deps``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import structlog
from litestar.di import NamedDependency
from psycopg_pool import AsyncConnectionPool

from govflow.api.auth import TokenAuth
from govflow.consumers.streams import RedisClient
from govflow.core.connect import connect, unprobed
from govflow.core.pool_metrics import POOLS
from govflow.core.unavailable import UNAVAILABLE, is_unavailable
from govflow.operations import lag
from govflow.operations.decisions import Decisions
from govflow.producers.publish import Publisher
from govflow.schemas.settings import Settings

log = structlog.get_logger(__name__)

POOL_TIMEOUT_S = 5.0  # a request waits this long for a Postgres connection, then 503


class Resources:
    """What the handlers share: the settings and the connections the lifespan opened."""

    def __init__(self, settings: Settings) -> None:
        if settings.redis_url is None or settings.database_url is None:
            raise ValueError("the API needs a Redis URL and a database URL")
        self.auth = TokenAuth(settings.tokens())
        self.keys = settings.keys()
        self.overdue_after_s = settings.reconcile_after
        self.redis_url = settings.redis_url
        self.database_url = settings.database_url
        self._redis: RedisClient | None = None
        self._pool: AsyncConnectionPool[Any] | None = None
        self._publisher: Publisher | None = None
        self._decisions: Decisions | None = None
        self.last_lag: lag.LagReport | None = None  # served again when a scrape cannot read

    @property
    def redis(self) -> RedisClient:
        """The Redis client (bytes replies)."""
        assert self._redis is not None, "used outside the app's lifespan"
        return self._redis

    @property
    def publisher(self) -> Publisher:
        """The publisher of ``POST /events``: one, so it checks the partitions once."""
        assert self._publisher is not None, "used outside the app's lifespan"
        return self._publisher

    @property
    def decisions(self) -> Decisions:
        """Decide approvals and complete tasks: the operation the CLI calls too."""
        assert self._decisions is not None, "used outside the app's lifespan"
        return self._decisions

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The autocommit Postgres pool."""
        assert self._pool is not None, "used outside the app's lifespan"
        return self._pool

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """Open the client and the pool for the life of the app; close both after."""
        self._redis = await _redis_client(self.redis_url)
        self._publisher = Publisher(self._redis, self.keys)
        self._pool = AsyncConnectionPool(
            self.database_url,
            min_size=1,
            max_size=8,
            open=False,
            timeout=POOL_TIMEOUT_S,
            kwargs={"autocommit": True, "connect_timeout": 5},
        )
        # Without waiting: Postgres may be down; requests that need it get a 503 meanwhile.
        await self._pool.open(wait=False)
        self._decisions = Decisions(self._pool, self._redis, self.keys)
        POOLS.watch("api", self._pool)
        try:
            yield
        finally:
            POOLS.unwatch(self._pool)
            with anyio.CancelScope(shield=True):
                await self._pool.close()
                await self._redis.aclose()


async def _redis_client(url: str) -> RedisClient:
    """The API's client of a Redis server or cluster; a plain one if Redis is away at start.

    Redis being down must not keep the API from starting (its requests answer 503 until
    Redis is back), but then it cannot say whether it is a cluster: the client assumes a
    single server unless the URL says ``?cluster=yes``.
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": 2, "socket_timeout": 10, "health_check_interval": 15,
    }  # fmt: skip
    try:
        return await connect(url, **options)
    except UNAVAILABLE as e:
        if not is_unavailable(e):
            raise
        log.warning("api.redis_unavailable", error=str(e))
        return unprobed(url, **options)


# How handlers ask for the resources (Litestar injects them by this name, `gf`).
Deps = NamedDependency[Resources]
