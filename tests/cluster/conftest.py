"""Fixtures of the Redis Cluster tests: one 6-node cluster per session, a prefix per test.

The cluster is real (``benchmarks/cluster.py``): ``redis-server --cluster-enabled yes`` six times on
free loopback ports, joined by ``redis-cli --cluster create``; it stops at the end of the
session. Postgres comes from the suite's ``database_url`` fixture.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from benchmarks.cluster import Cluster, running_cluster
from govflow.consumers.streams import RedisClient
from govflow.core.connect import connect
from govflow.schemas.settings import Settings

PARTITIONS = 8
# Short, so takeovers and rebalancing happen within seconds; long enough that a busy
# machine starving a worker for a second does not cost it its partitions.
LEASE_TTL_S = 3.0


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """A 3-primary, 3-replica Redis Cluster on loopback, for the whole session."""
    root = Path(tempfile.mkdtemp(prefix="gfc-", dir="/tmp"))
    try:
        with running_cluster(root) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster_prefix(redis_cluster: Cluster) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted from every primary afterwards."""
    name = f"c{secrets.token_hex(6)}"
    yield name
    for node in redis_cluster.alive():
        with node.client() as client:
            if client.info("replication").get("role") != "master":
                continue
            keys = list(client.scan_iter(match=f"{name}:*", count=1000))
            for key in keys:
                client.unlink(key)  # one at a time: keys of one call must share a slot


@pytest.fixture
async def cluster_redis(redis_cluster: Cluster, anyio_backend: str) -> AsyncIterator[RedisClient]:
    """A cluster client (bytes replies), closed afterwards."""
    client = await connect(redis_cluster.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def cluster_settings(
    redis_cluster: Cluster, database_url: str, cluster_prefix: str, tmp_path: Path
) -> Callable[..., Settings]:
    """Settings on the cluster: 8 partitions, short leases, fast retries; with overrides."""
    base: dict[str, Any] = {
        "redis_url": redis_cluster.url,
        "database_url": database_url,
        "data_dir": str(tmp_path / "data"),
        "prefix": cluster_prefix,
        "partitions": PARTITIONS,
        "lease_ttl": LEASE_TTL_S,
        "backoff_base": 0.1,
        "claim_idle": 5.0,
        "shutdown_grace": 10.0,
        "webhook_allowed_hosts": "127.0.0.1",  # the receivers listen on loopback
    }

    def make(**overrides: Any) -> Settings:
        return msgspec.convert({**base, **overrides}, Settings)

    return make
