"""deploy/redis/users.acl on a Redis Cluster: each part of govflow runs under its own user.

A cluster of its own (3 primaries, 3 replicas) loads the shipped ACL file on every node,
with a password added to each govflow user and the ``default`` user opened for the
fixture's own administration. The producer publishes with ``SyncPublisher``, a worker
runs the pipeline over 8 partitions, and the operator reads the lag: each as its user.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from psycopg_pool import AsyncConnectionPool

from benchmarks.cluster import Cluster, running_cluster
from govflow.operations.lag import read_lag
from govflow.producers.publish import SyncPublisher
from govflow.runtime.connections import redis_client
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.pipeline_helpers import apply, running_worker, statuses, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.cluster, pytest.mark.slow]

ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "users.acl"
PASSWORDS = {"producer": "producer-pw", "worker": "worker-pw", "operator": "operator-pw"}
KEYS = Keys("govflow", 8)  # the prefix users.acl is written for
WORKFLOW = """
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
"""


def acl_text() -> str:
    """users.acl with a password for each govflow user and an open ``default`` user."""
    lines = []
    for line in ACL_FILE.read_text().splitlines():
        name = line.split()[1]
        if name == "default":
            line = "user default on nopass ~* &* +@all"  # the fixture's cluster commands
        elif name.removeprefix("govflow-") in PASSWORDS:
            line += f" >{PASSWORDS[name.removeprefix('govflow-')]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def acl_cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="gfc-acl-", dir="/tmp"))
    try:
        acl = root / "users.acl"
        acl.write_text(acl_text())
        with running_cluster(root / "nodes", extra=["--aclfile", str(acl)]) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def url_of(cluster: Cluster, role: str) -> str:
    return f"redis://govflow-{role}:{PASSWORDS[role]}@127.0.0.1:{cluster.nodes[0].port}/0"


async def test_producer_worker_and_operator_each_under_their_user(
    acl_cluster: Cluster, database_url: str, pool: AsyncConnectionPool[Any], tmp_path: Path
) -> None:
    def settings(role: str) -> Settings:
        return msgspec.convert(
            {
                "redis_url": url_of(acl_cluster, role),
                "database_url": database_url,
                "data_dir": str(tmp_path / "data"),
                "prefix": KEYS.prefix,
                "partitions": KEYS.partitions,
                "lease_ttl": 3.0,
            },
            Settings,
        )

    await apply(pool, WORKFLOW)
    events = [new_event("policy.created", f"POL-{i}", data={"title": str(i)}) for i in range(40)]
    # The producer may not run INFO: its URL says what the server is.
    with SyncPublisher.from_url(f"{url_of(acl_cluster, 'producer')}?cluster=yes", KEYS) as p:
        p.publish_many(events)

    async with running_worker(settings("worker")):
        await wait_for(lambda: statuses(pool), lambda s: s == {"completed": len(events)},
                       within=90, what="every event's execution completed")  # fmt: skip

    async with redis_client(settings("operator")) as redis:
        report = await read_lag(redis, None, KEYS)
    assert len(report.groups) == 2 * KEYS.partitions
    assert sum(g.length for g in report.groups if g.group == "triggers") == len(events)
    assert all(g.lag == 0 and g.pending == 0 for g in report.groups), report.groups
