"""The operator's tools and the publishers on a real Redis Cluster.

A deployment on a cluster is given the same URL shape as one on a single server; the
commands ask the node whether it is a cluster and read or write every partition.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.streams import RedisClient
from govflow.operations.workers import read_workers
from govflow.producers.publish import Publisher, SyncPublisher
from govflow.schemas.events import new_event
from govflow.schemas.settings import Settings
from tests.ops_helpers import govflow, govflow_env
from tests.pipeline_helpers import fetch, running_worker, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.cluster, pytest.mark.slow]


def cluster_env(settings: Settings) -> dict[str, str]:
    """The environment of a ``govflow`` command for this deployment on the cluster."""
    assert settings.redis_url is not None
    assert settings.database_url is not None
    env = govflow_env(settings.redis_url, settings.database_url, settings.prefix)
    return {**env, "GOVFLOW_PARTITIONS": str(settings.partitions)}


async def test_publish_lag_and_replay_from_the_command_line(
    cluster_settings: Callable[..., Settings],
    cluster_redis: RedisClient,
    pool: AsyncConnectionPool[Any],
) -> None:
    settings = cluster_settings(heartbeat_interval=0.5)
    keys = settings.keys()
    env = cluster_env(settings)

    published = await govflow(env, "publish", "policy.created", "--entity-id", "P-7")
    assert published.returncode == 0, published.stderr.decode()
    event_id = published.stdout.decode().strip()
    stream = keys.events(keys.partition_of("P-7"))
    entries: Any = await cluster_redis.xrange(stream)
    assert [e[1][b"event"] for e in entries if event_id.encode() in e[1][b"event"]]

    # A poison entry on another shard's partition is dead-lettered with its reason.
    poison_stream = keys.events(keys.partition_of("P-8"))
    await cluster_redis.xadd(poison_stream, {"event": b"{not json"})
    async with running_worker(settings):
        await wait_for(
            lambda: fetch(pool, "SELECT stream, error FROM dead_letters"),
            lambda rows: len(rows) == 1,
            within=60,
            what="the poison entry dead-lettered",
        )

        lag = await govflow(env, "lag", "--json")
        assert lag.returncode == 0, lag.stderr.decode()
        report = json.loads(lag.stdout)
        streams = {g["stream"] for g in report["groups"]}
        assert streams == {keys.stream(role, p) for role in ("events", "commands")
                           for p in keys.all_partitions()}  # fmt: skip
        assert report["dead_letters"] == 1

        # The heartbeat (its hash and the index live on different shards) says which
        # partitions the one worker leases: all of them, once it took them.
        every = list(keys.all_partitions())
        await wait_for(
            lambda: read_workers(cluster_redis, keys),
            lambda ws: (
                [(w.state, w.partitions) for w in ws]
                == [("live", {"triggers": every, "actions": every})]
            ),
            within=60,
            what="one live worker leasing every partition",
        )
        probe = await govflow(env, "check")
        assert probe.returncode == 0, probe.stderr.decode()

    replayed = await govflow(env, "dlq", "replay", "--all", "--json", "--reason", "test")
    assert replayed.returncode == 0, replayed.stderr.decode()
    [letter] = json.loads(replayed.stdout)["replayed"]
    assert letter["stream"] == poison_stream
    assert await cluster_redis.xlen(poison_stream) == 2  # the poison entry, then its replay


async def test_publishers_from_a_url_that_says_cluster(
    cluster_settings: Callable[..., Settings], cluster_redis: RedisClient
) -> None:
    settings = cluster_settings()
    assert settings.redis_url is not None
    keys = settings.keys()
    url = f"{settings.redis_url}?cluster=yes"
    events = [new_event("policy.created", f"P-{i}") for i in range(40)]

    async with Publisher.from_url(url, keys) as publisher:
        await publisher.publish_many(events[:20])
    with SyncPublisher.from_url(url, keys) as sync_publisher:
        sync_publisher.publish_many(events[20:])

    lengths = [await cluster_redis.xlen(keys.events(p)) for p in keys.all_partitions()]
    assert sum(lengths) == len(events)
    assert sum(1 for n in lengths if n) > 1, "every event went to one partition"
