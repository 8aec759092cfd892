"""Retry delays are capped, and retries are scheduled and moved by the Redis server's clock."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from govflow.consumers import scripts
from govflow.consumers.outcomes import RetryPolicy
from govflow.consumers.streams import Streams
from govflow.schemas.errors import ConfigError
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings

GROUP = "actions"


@pytest.mark.parametrize("attempt", [1, 20, 1_026, 10**9])
def test_a_retry_waits_no_longer_than_the_cap(attempt: int) -> None:
    policy = RetryPolicy(max_attempts=10**9, backoff_base=2.0, backoff_max=60.0)
    delays = [policy.delay(attempt) for _ in range(50)]
    assert all(0 < d <= 60.0 for d in delays)
    if attempt > 10:
        assert min(delays) == 60.0


def test_the_first_retries_still_double() -> None:
    policy = RetryPolicy(backoff_base=2.0, backoff_max=3600.0)
    assert 1.6 <= policy.delay(1) <= 2.4
    assert 12.8 <= policy.delay(4) <= 19.2


def test_the_cap_is_read_and_checked() -> None:
    settings = Settings.from_env({"GOVFLOW_BACKOFF_MAX": "120"})
    assert settings.backoff_max == 120.0
    assert Settings.from_env({}).backoff_max == 3600.0
    with pytest.raises(ConfigError, match="GOVFLOW_BACKOFF_MAX"):
        Settings.from_env({"GOVFLOW_BACKOFF_MAX": "0"})
    with pytest.raises(ConfigError, match="shorter than GOVFLOW_BACKOFF_BASE"):
        Settings.from_env({"GOVFLOW_BACKOFF_MAX": "1", "GOVFLOW_BACKOFF_BASE": "2"})


async def _server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.mark.anyio
async def test_a_retry_is_due_by_the_servers_clock_and_moved_by_it(
    any_redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix, 1)
    streams = Streams(any_redis)
    stream = keys.commands()
    await streams.ensure_group(stream, GROUP)
    for i in range(2):
        await any_redis.xadd(stream, {"command": f"c{i}"})
    now, soon = await streams.read(stream, GROUP, "w1", 10, 100)
    before = await _server_ms(any_redis)
    for entry, delay_ms in ((now, 0), (soon, 600_000)):
        await streams.run(
            scripts.ack_and_schedule_retry(
                stream=stream, group=GROUP, entry_id=entry.id, retry_set=keys.retry(),
                delay_ms=delay_ms, to="commands", fields=entry.fields, fence=None,
            )
        )  # fmt: skip
    after = await _server_ms(any_redis)
    scores: Any = await any_redis.zrange(keys.retry(), 0, -1, withscores=True)
    due = sorted(int(score) for _, score in scores)
    assert before <= due[0] <= after
    assert before + 600_000 <= due[1] <= after + 600_000

    # The mover reads the same clock: the one due now moves, the other stays.
    assert await streams.move_due(keys.retry(), keys.events(), keys.commands(), keys.dead()) == 1
    assert await any_redis.zcard(keys.retry()) == 1
    assert await any_redis.xlen(stream) == 3
