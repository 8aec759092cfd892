"""Connections for the operator commands: a Redis client and a small Postgres pool.

The Redis URL may name a single server or a Redis Cluster node (``govflow.core.connect``).

``govflow lag``, ``dlq`` and ``executions`` open these once per run; the HTTP API keeps
its own for the life of the server and calls the same functions with them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.streams import RedisClient
from govflow.core.connect import connect
from govflow.schemas.errors import ConfigError
from govflow.schemas.settings import Settings

CONNECT_TIMEOUT_S = 10


@asynccontextmanager
async def redis_client(settings: Settings) -> AsyncIterator[RedisClient]:
    """A Redis client (bytes replies) for one command; closed at the end."""
    if settings.redis_url is None:
        raise ConfigError("no Redis URL: set GOVFLOW_REDIS_URL")
    client = await connect(
        settings.redis_url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=30
    )
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def database_pool(
    settings: Settings, max_size: int = 4
) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """A small autocommit pool for one command, open; closed at the end."""
    if settings.database_url is None:
        raise ConfigError("no database URL: set GOVFLOW_DATABASE_URL")
    # One plain connection first: a wrong URL or a server that is down fails at once with
    # Postgres's own words, where the pool would retry until its timeout.
    conn = await psycopg.AsyncConnection.connect(
        settings.database_url, connect_timeout=CONNECT_TIMEOUT_S
    )
    await conn.close()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=max_size,
        open=False,
        kwargs={"autocommit": True},
    )
    await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    try:
        yield pool
    finally:
        await pool.close()
