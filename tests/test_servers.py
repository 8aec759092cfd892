"""Where the servers come from: configured, a container, or embedded under a data dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis as redis_sync
import structlog

from govflow.cli.context import resolved
from govflow.runtime.embedded import SOCKET_PATH_MAX, embedded_postgres, embedded_redis
from govflow.schemas.settings import Settings
from tests._servers import (
    POSTGRES_IMAGE,
    REDIS_IMAGE,
    docker_engine_answers,
    docker_host,
)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh, short data directory (the Redis socket must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="gf-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)  # pgserver's files: another owner


def redis_answers(url: str) -> bool:
    client = redis_sync.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis_sync.exceptions.ConnectionError:
        return False
    finally:
        client.close()


def postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


class TestConfigured:
    @pytest.mark.anyio
    async def test_the_session_redis_answers(self, redis, prefix):
        assert await redis.ping()
        await redis.set(f"{prefix}:probe", b"1")
        assert await redis.get(f"{prefix}:probe") == b"1"  # bytes, not str

    def test_the_session_postgres_answers(self, database_url):
        assert postgres_answers(database_url)

    def test_the_embedded_redis_is_6_2(self, embedded_redis_url):
        client = redis_sync.Redis.from_url(embedded_redis_url)
        try:
            assert client.info("server")["redis_version"].startswith("6.2.")
        finally:
            client.close()

    def test_the_prefix_teardown_deletes_only_its_keys(self, redis_server_url, prefix):
        # Another test's prefix, written by hand: it must survive this test's teardown.
        client = redis_sync.Redis.from_url(redis_server_url)
        try:
            client.set(f"{prefix}x:other", b"1", ex=60)
            assert client.exists(f"{prefix}x:other")
        finally:
            client.close()


@pytest.mark.slow
def test_testcontainers_servers_answer():
    if not docker_engine_answers():
        pytest.skip(f"no Docker engine answers at {docker_host()}: testcontainers not tried")
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.redis import RedisContainer

    with RedisContainer(REDIS_IMAGE) as r, PostgresContainer(POSTGRES_IMAGE, driver=None) as p:
        host, port = r.get_container_host_ip(), r.get_exposed_port(6379)
        assert redis_answers(f"redis://{host}:{port}/0")
        assert postgres_answers(p.get_connection_url())


class TestEmbeddedRedis:
    def test_starts_answers_is_reused_stops_and_keeps_its_data(self, data_dir):
        with embedded_redis(data_dir) as url:
            assert url == f"unix://{data_dir.resolve()}/redis/redis.sock"
            client = redis_sync.Redis.from_url(url)
            client.set("kept", b"across restarts")
            client.close()
            pid = int((data_dir / "redis" / "redis.pid").read_text())

            with embedded_redis(data_dir) as again:
                assert again == url
            assert redis_answers(url), "the second call stopped a server it did not start"
            assert int((data_dir / "redis" / "redis.pid").read_text()) == pid

        assert not redis_answers(url)
        assert not (data_dir / "redis" / "redis.pid").exists()
        assert b"kept" in (data_dir / "redis" / "appendonly.aof").read_bytes()

        with embedded_redis(data_dir) as url:
            client = redis_sync.Redis.from_url(url)
            assert client.get("kept") == b"across restarts"
            client.close()

    def test_a_long_data_dir_falls_back_to_tcp(self, data_dir):
        deep = data_dir / ("d" * 100)
        assert len(str(deep / "redis" / "redis.sock")) > SOCKET_PATH_MAX
        with embedded_redis(deep) as url:
            assert url.startswith("redis://127.0.0.1:")
            assert redis_answers(url)
        assert not redis_answers(url)


class TestEmbeddedPostgres:
    @pytest.mark.slow
    def test_starts_answers_is_reused_stops_and_keeps_its_data(self, data_dir):
        with embedded_postgres(data_dir) as url:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE TABLE kept (v text)")
                conn.execute("INSERT INTO kept VALUES ('across restarts')")
            with embedded_postgres(data_dir) as again:
                assert again == url
            assert postgres_answers(url), "the inner call stopped a server still in use"

        assert not postgres_answers(url)
        assert not (data_dir / "pg" / "postmaster.pid").exists()

        with embedded_postgres(data_dir) as url, psycopg.connect(url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == ("across restarts",)


# Run in a child process: it must find the parent's servers and leave them running.
_CHILD = """
import json, sys
from pathlib import Path
from govflow.runtime.embedded import embedded_postgres, embedded_redis
data_dir = Path(sys.argv[1])
with embedded_redis(data_dir) as redis_url, embedded_postgres(data_dir) as database_url:
    print(json.dumps([redis_url, database_url]))
"""


@pytest.mark.slow
def test_another_process_reuses_the_servers_and_leaves_them_running(data_dir):
    with embedded_redis(data_dir) as redis_url, embedded_postgres(data_dir) as database_url:
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(data_dir)],
            capture_output=True,
            check=True,
            timeout=60,
            cwd=Path(__file__).parent.parent,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        # The last line: as root, a warning names the OS user the embedded Postgres runs as.
        assert json.loads(child.stdout.splitlines()[-1]) == [redis_url, database_url]
        assert redis_answers(redis_url)
        assert postgres_answers(database_url)
    assert not redis_answers(redis_url)
    assert not postgres_answers(database_url)


@pytest.mark.slow
def test_resolved_starts_only_the_missing_servers_and_says_so(data_dir):
    configured = Settings(database_url="postgresql://db.invalid/app", data_dir=str(data_dir))
    with structlog.testing.capture_logs() as logs, resolved(configured, start=True) as settings:
        assert settings.database_url == configured.database_url
        assert settings.redis_url is not None
        assert redis_answers(settings.redis_url)
    [using] = [e for e in logs if e["event"] == "embedded.using"]
    assert using["data_dir"] == str(data_dir.resolve())
    assert using["servers"] == ["redis_url"]
    assert not redis_answers(settings.redis_url)


def test_resolved_starts_nothing_the_command_does_not_need(data_dir):
    configured = Settings(redis_url="redis://r.invalid:6379/0", data_dir=str(data_dir))
    with structlog.testing.capture_logs() as logs, resolved(configured, database=False) as s:
        assert s is configured
    assert logs == []


def test_resolved_starts_nothing_when_both_are_configured():
    configured = Settings(redis_url="redis://r.invalid:6379/0", database_url="postgres://d/x")
    with structlog.testing.capture_logs() as logs, resolved(configured) as settings:
        assert settings is configured
    assert logs == []
