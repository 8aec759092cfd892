"""The publisher library: the wire format, partitions, retries, and a typed error."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from govflow.core.connect import split_flag
from govflow.producers import Publisher, PublishError, PublishRetry, SyncPublisher
from govflow.runtime.embedded import redis_server_binary
from govflow.schemas.codec import decode_event
from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys

FAST = PublishRetry(attempts=3, initial_delay=0.01, max_delay=0.05)
PASSWORD = "s3cret-Pa55word"


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def fields_of(reply: Any) -> list[dict[bytes, bytes]]:
    """The fields of each entry of an XRANGE reply, which redis-py types loosely."""
    return [fields for _, fields in reply]


@pytest.fixture
def sync_redis(redis_server_url: str) -> Iterator[SyncRedis]:
    client = SyncRedis.from_url(redis_server_url)
    yield client
    client.close()


def policy(entity_id: str = "POL-1", **data: str) -> Event:
    return new_event("policy.created", entity_id, tenant="acme", data=dict(data), actor="u1")


@pytest.mark.anyio
async def test_publish_writes_one_entry_with_one_event_field(redis: Redis, prefix: str) -> None:
    event = policy(title="Access control")
    publisher = Publisher(redis, Keys(prefix))

    assert await publisher.publish(event) == event.id

    [fields] = fields_of(await redis.xrange(f"{prefix}:events"))
    assert list(fields) == [b"event"]
    assert decode_event(fields[b"event"]) == event


@pytest.mark.anyio
async def test_publish_many_keeps_order_and_returns_ids(redis: Redis, prefix: str) -> None:
    events = [policy(f"POL-{i}") for i in range(50)]
    async with Publisher(redis, Keys(prefix)) as publisher:
        ids = await publisher.publish_many(events)

    assert ids == [e.id for e in events]
    stored = [
        decode_event(f[b"event"]).id for f in fields_of(await redis.xrange(f"{prefix}:events"))
    ]
    assert stored == ids
    assert await redis.ping()  # a client we were given stays open


@pytest.mark.anyio
async def test_publish_many_of_nothing_writes_nothing(redis: Redis, prefix: str) -> None:
    assert await Publisher(redis, Keys(prefix)).publish_many([]) == []
    assert await redis.exists(f"{prefix}:events") == 0


@pytest.mark.anyio
async def test_from_url_owns_and_closes_its_client(redis_server_url: str, prefix: str) -> None:
    async with Publisher.from_url(redis_server_url, Keys(prefix)) as publisher:
        event_id = await publisher.publish(policy())
    client = SyncRedis.from_url(redis_server_url)
    try:
        [fields] = fields_of(client.xrange(f"{prefix}:events"))
    finally:
        client.close()
    assert decode_event(fields[b"event"]).id == event_id


def test_sync_publisher(sync_redis: SyncRedis, redis_server_url: str, prefix: str) -> None:
    event = policy(title="Sync")
    with SyncPublisher.from_url(redis_server_url, Keys(prefix)) as publisher:
        assert publisher.publish(event) == event.id
        more = [policy(f"POL-{i}") for i in range(3)]
        assert publisher.publish_many(more) == [e.id for e in more]

    stored = [decode_event(f[b"event"]) for f in fields_of(sync_redis.xrange(f"{prefix}:events"))]
    assert stored == [event, *more]


def test_a_cluster_flag_in_the_url_is_understood(
    sync_redis: SyncRedis, redis_server_url: str, prefix: str
) -> None:
    """``?cluster=no`` is for govflow (decide without asking), not for redis-py."""
    separator = "&" if "?" in redis_server_url else "?"
    with SyncPublisher.from_url(f"{redis_server_url}{separator}cluster=no", Keys(prefix)) as p:
        event_id = p.publish(policy())
    assert [decode_event(f[b"event"]).id for f in fields_of(sync_redis.xrange(f"{prefix}:events"))] == [event_id]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "plain", "flag"),
    [
        ("unix:///run/redis.sock", "unix:///run/redis.sock", None),
        ("unix:///run/redis.sock?cluster=no", "unix:///run/redis.sock", False),
        ("unix:///run/redis.sock?db=2&cluster=no", "unix:///run/redis.sock?db=2", False),
        ("redis://u:p%40ss@h:6379/0?cluster=yes&ssl_cert_reqs=none", "redis://u:p%40ss@h:6379/0?ssl_cert_reqs=none", True),
        ("rediss://h/0?CLUSTER=1", "rediss://h/0?CLUSTER=1", None),
    ],
)  # fmt: skip
def test_the_cluster_flag_leaves_the_rest_of_the_url_as_written(
    url: str, plain: str, flag: bool | None
) -> None:
    assert split_flag(url) == (plain, flag)


def test_sync_publisher_over_a_given_client(sync_redis: SyncRedis, prefix: str) -> None:
    with SyncPublisher(sync_redis, Keys(prefix)) as publisher:
        publisher.publish(policy())
    assert sync_redis.xlen(f"{prefix}:events") == 1
    assert sync_redis.ping()


@pytest.mark.anyio
async def test_partitions_route_by_entity(redis: Redis, prefix: str) -> None:
    keys = Keys(prefix, partitions=4)
    events = [policy(f"POL-{i}") for i in range(40)]
    await Publisher(redis, keys).publish_many(events)

    seen: dict[int, list[str]] = {}
    for p in keys.all_partitions():
        for fields in fields_of(await redis.xrange(keys.events(p))):
            seen.setdefault(p, []).append(decode_event(fields[b"event"]).entity_id)
    expected: dict[int, list[str]] = {}
    for e in events:
        expected.setdefault(keys.partition_of(e.entity_id), []).append(e.entity_id)
    assert seen == expected
    assert len(seen) > 1  # 40 entities do spread over the partitions
    assert await redis.exists(f"{prefix}:events") == 0  # no unpartitioned stream


@pytest.mark.anyio
async def test_publish_never_trims(redis: Redis, prefix: str) -> None:
    publisher = Publisher(redis, Keys(prefix))
    for _ in range(3):
        await publisher.publish_many([policy(f"POL-{i}") for i in range(200)])
    assert await redis.xlen(f"{prefix}:events") == 600


@pytest.mark.anyio
async def test_unreachable_redis_raises_publish_error_without_password() -> None:
    url = f"redis://govflow:{PASSWORD}@127.0.0.1:{closed_port()}/0"
    async with Publisher.from_url(url, Keys("t"), retry=FAST) as publisher:
        with pytest.raises(PublishError) as caught:
            await publisher.publish(policy())
    message = str(caught.value)
    assert "after 3 attempts" in message
    assert "127.0.0.1" in message
    assert PASSWORD not in message


@pytest.mark.anyio
async def test_an_unreachable_cluster_raises_publish_error_without_password() -> None:
    url = f"redis://govflow:{PASSWORD}@127.0.0.1:{closed_port()}/0?cluster=yes"
    async with Publisher.from_url(url, Keys("t", 2), retry=FAST) as publisher:
        with pytest.raises(PublishError, match="after 3 attempts") as caught:
            await publisher.publish(policy())
    assert PASSWORD not in str(caught.value)
    with pytest.raises(PublishError, match=r"Redis Cluster at 127\.0\.0\.1") as caught:
        SyncPublisher.from_url(url, Keys("t", 2), retry=FAST)
    assert PASSWORD not in str(caught.value)


def test_sync_unreachable_redis_raises_publish_error_without_password() -> None:
    url = f"redis://govflow:{PASSWORD}@127.0.0.1:{closed_port()}/0"
    with (
        SyncPublisher.from_url(url, Keys("t"), retry=FAST) as publisher,
        pytest.raises(PublishError) as caught,
    ):
        publisher.publish_many([policy(), policy()])
    assert "after 3 attempts" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_wrong_password_is_not_retried(redis_server_url: str) -> None:
    client = SyncRedis.from_url(redis_server_url)
    try:
        if client.config_get("requirepass").get("requirepass"):
            pytest.skip("the test Redis already has a password")
    finally:
        client.close()
    # An unknown user is refused at AUTH: an error no retry fixes, so one attempt.
    scheme, _, rest = redis_server_url.partition("://")
    url = f"{scheme}://nobody:{PASSWORD}@{rest}"
    with (
        SyncPublisher.from_url(url, Keys("t"), retry=PublishRetry(attempts=5)) as publisher,
        pytest.raises(PublishError) as caught,
    ):
        publisher.publish(policy())
    assert "after 1 attempt:" in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.slow
def test_publish_retries_until_redis_comes_up() -> None:
    port = closed_port()
    binary = str(redis_server_binary())
    server: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        server.append(
            subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    timer = threading.Timer(0.3, start)
    timer.start()
    patient = PublishRetry(attempts=20, initial_delay=0.1, max_delay=0.3)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        with SyncPublisher.from_url(url, Keys("t"), retry=patient) as publisher:
            event = policy()
            assert publisher.publish(event) == event.id
        client = SyncRedis.from_url(url)
        try:
            assert client.xlen("t:events") == 1
        finally:
            client.close()
    finally:
        timer.join()
        for process in server:
            process.terminate()
            process.wait(timeout=10)
