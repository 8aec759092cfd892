"""Fixtures of the fault-injection suite: servers of its own, which it may kill.

One Postgres cluster for the suite (initdb takes seconds on a busy machine), with a fresh
migrated database per test; one Redis per test, in its own directory with its own AOF.
Whatever a test did to them, the next test finds the Postgres server running.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from govflow.db.migrate import migrate
from tests._servers import run_async
from tests.faults.servers import (
    PostgresServer,
    RedisServer,
    embedded_redis_binary,
    postgres_server,
    redis_server,
    scratch_dir,
)
from tests.fix_db import create_database, drop_database


@pytest.fixture(scope="package")
def fault_dir() -> Iterator[Path]:
    """A short scratch directory for the suite's servers, removed at the end."""
    with scratch_dir("gf-faults-") as path:
        yield path


@pytest.fixture(scope="package")
def fault_postgres(fault_dir: Path) -> Iterator[PostgresServer]:
    """The suite's own Postgres cluster, with a migrated template database."""
    with postgres_server(fault_dir / "pg") as server:
        url = create_database(server.url, "govflow_template")
        run_async(migrate, url)
        yield server


@pytest.fixture
def fault_database_url(fault_postgres: PostgresServer) -> Iterator[str]:
    """A migrated database of this test's own on the suite's Postgres; dropped afterwards."""
    if not fault_postgres.running():
        fault_postgres.start()
    name = f"govflow_{secrets.token_hex(4)}"
    url = create_database(fault_postgres.url, name, template="govflow_template")
    try:
        yield url
    finally:
        if not fault_postgres.running():
            fault_postgres.start()
        drop_database(fault_postgres.url, name)


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (AOF, ``appendfsync always``) that it may kill."""
    with scratch_dir("gf-redis-") as folder, redis_server(folder) as server:
        yield server


@pytest.fixture
def fault_redis_62() -> Iterator[RedisServer]:
    """Like ``fault_redis``, on the Redis 6.2 that the embedded server runs."""
    with (
        scratch_dir("gf-redis62-") as folder,
        redis_server(folder, binary=embedded_redis_binary()) as server,
    ):
        yield server


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """Where the test's worker processes write their logs."""
    path = tmp_path / "logs"
    path.mkdir()
    return path
