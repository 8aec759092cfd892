"""The test harness: real Redis and Postgres (see fix_redis.py and fix_db.py), anyio on asyncio.

Where the servers come from, in this order: ``TEST_REDIS_URL`` / ``TEST_DATABASE_URL``;
else testcontainers when a Docker engine answers; else the embedded servers, started once
per session in a short temporary directory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from govflow.schemas.settings import Settings

pytest_plugins = ["tests.fix_redis", "tests.fix_db"]

LOOPBACK = "127.0.0.1"  # where every test's webhook receiver listens

# A test that uses one of these fixtures gets the marker: `pytest -m "not pg"` works.
_MARKER_OF_FIXTURE = {
    "redis_server_url": "redis",
    "embedded_redis_url": "redis",
    "database_server_url": "pg",
    "embedded_database_url": "pg",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "redis: needs Redis")
    config.addinivalue_line("markers", "pg: needs Postgres")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for marker in sorted({m for f, m in _MARKER_OF_FIXTURE.items() if f in names}):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run async tests and fixtures on asyncio only (govflow's production loop)."""
    return "asyncio"


@pytest.fixture(scope="session")
def embedded_data_dir() -> Iterator[Path]:
    """A data directory for the session's embedded servers, removed at the end."""
    # Under /tmp and short: the Redis socket path must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="gf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_settings(
    redis_server_url: str, database_url: str, prefix: str, tmp_path: Path
) -> Callable[..., Settings]:
    """Build validated ``Settings`` for this test's prefix and database, with overrides."""
    base: dict[str, Any] = {
        "redis_url": redis_server_url,
        "database_url": database_url,
        "data_dir": str(tmp_path / "data"),
        "prefix": prefix,
        "backoff_base": 0.05,
        "claim_idle": 2.0,
        # The tests' webhook receivers listen on loopback, which is refused by default.
        "webhook_allowed_hosts": LOOPBACK,
    }

    def make(**overrides: Any) -> Settings:
        return msgspec.convert({**base, **overrides}, Settings)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Settings for this test: its own key prefix and database, fast retries and claims."""
    return make_settings()
