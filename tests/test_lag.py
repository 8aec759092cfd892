"""``govflow lag``: every figure against streams put in a known state, on Redis 7 and 6.2.

The state: entries acknowledged and then trimmed, entries pending with two consumers,
entries undelivered, one of them deleted ahead of the group (which makes Redis 7 report
its lag as NULL), a second group created at an arbitrary id (NULL too), a stream whose
lag Redis 7 does report, retries scheduled, dead letters and outbox rows.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db import dead_letters, outbox
from govflow.operations.lag import LagReport, read_lag
from govflow.operations.lag_metrics import LagCollector
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from tests.ops_helpers import govflow, govflow_env
from tests.test_cli import ROOT

pytestmark = pytest.mark.anyio

AGES_S = [100 - i for i in range(10)]  # the age of events entry i when the state is made


async def server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds * 1000 + micros // 1000)


async def make_known_state(redis: Redis, pool: AsyncConnectionPool[Any], keys: Keys) -> list[str]:
    """Build the state the module docstring describes; return the events entry ids."""
    events, commands = keys.events(), keys.commands()
    now = await server_ms(redis)
    ids = [f"{now - age * 1000}-0" for age in AGES_S]
    for entry_id in ids:
        await redis.xadd(events, {"event": "{}"}, id=entry_id)
    await redis.xgroup_create(events, "triggers", id="0")
    await redis.xreadgroup("triggers", "c1", {events: ">"}, count=3)  # 0, 1, 2
    await redis.xreadgroup("triggers", "c2", {events: ">"}, count=3)  # 3, 4, 5
    await redis.xack(events, "triggers", ids[0], ids[1], ids[3])  # pending: 2, 4, 5
    assert await redis.xtrim(events, minid=ids[2], approximate=False) == 2  # 0, 1 (acked)
    assert await redis.xdel(events, ids[7]) == 1  # undelivered: 6, 8, 9
    await redis.xgroup_create(events, "audit", id=ids[8])  # undelivered: 9

    for n in range(5):
        await redis.xadd(commands, {"command": str(n)})
    await redis.xgroup_create(commands, "actions", id="0")
    delivered: Any = await redis.xreadgroup("actions", "a1", {commands: ">"}, count=2)
    await redis.xack(commands, "actions", delivered[0][1][0][0])

    await redis.zadd(keys.retry(), {"r1": now + 60_000, "r2": now + 120_000})
    async with pool.connection() as conn:
        await dead_letters.record(
            conn,
            [
                dead_letters.NewDeadLetter(
                    stream=events, message_id=f"1-{n}", payload={}, error="bad", attempts=1
                )
                for n in range(3)
            ],
        )
        await conn.execute("UPDATE dead_letters SET replayed_at = now() WHERE message_id = '1-0'")
        await conn.execute("UPDATE dead_letters SET purged_at = now() WHERE message_id = '1-1'")
        for n in range(2):
            await outbox.enqueue(conn, new_event("policy.created", f"P{n}"))
    return ids


def expected_document(keys: Keys) -> dict[str, Any]:
    """The ``govflow lag --json`` document for the known state, ages and idle times left out."""
    return {
        "groups": [
            {
                "stream": keys.events(),
                "group": "triggers",
                "length": 7,
                "lag": 3,
                "lag_valid": True,
                "pending": 3,
                # No worker runs them: shown while entries are pending for them.
                "consumers": [
                    {"name": "c1", "pending": 1, "live": False},
                    {"name": "c2", "pending": 2, "live": False},
                ],
                "held_entities": 0,
                "parked": 0,
                "paused": False,
            },
            {
                "stream": keys.events(),
                "group": "audit",
                "length": 7,
                "lag": 1,
                "lag_valid": True,
                "pending": 0,
                "oldest_pending_age_s": None,
                "consumers": [],
                "held_entities": 0,
                "parked": 0,
                "paused": False,
            },
            {
                "stream": keys.commands(),
                "group": "actions",
                "length": 5,
                "lag": 3,
                "lag_valid": True,
                "pending": 1,
                "consumers": [{"name": "a1", "pending": 1, "live": False}],
                "held_entities": 0,
                "parked": 0,
                "paused": False,
            },
        ],
        "retry_scheduled": 2,
        "dead_letters": 1,
        "outbox": {"waiting": 2, "overdue": 0},
        "overdue": 0,  # nothing untouched past the reconcile bound
        "waiting": 0,
        "timers_due": 0,
        "approvals_pending": 0,
        "tasks_open": 0,
        "paused": [],  # no group paused (govflow pause)
        "workers": [],  # no worker ran: no heartbeat (tests/test_workers.py)
    }


def check_document(doc: dict[str, Any], keys: Keys, elapsed_s: float) -> None:
    """Every field of the document; an age may have grown by at most ``elapsed_s``."""
    assert list(doc) == [
        "groups",
        "retry_scheduled",
        "dead_letters",
        "outbox",
        "overdue",
        "waiting",
        "timers_due",
        "approvals_pending",
        "tasks_open",
        "paused",
        "workers",
    ]
    fields = [
        "stream",
        "group",
        "length",
        "lag",
        "lag_valid",
        "pending",
        "oldest_pending_age_s",
        "oldest_undelivered_age_s",
        "consumers",
        "held_entities",  # per-entity order: see tests/test_ordering.py
        "parked",
        "paused",  # see tests/test_interventions.py
    ]
    assert [list(g) for g in doc["groups"]] == [fields] * 3

    def within(age: float | None, at_setup: float) -> bool:
        return age is not None and at_setup <= age <= at_setup + elapsed_s

    triggers, audit, actions = doc["groups"]
    assert within(triggers.pop("oldest_pending_age_s"), AGES_S[2])
    assert within(triggers.pop("oldest_undelivered_age_s"), AGES_S[6])
    assert within(audit.pop("oldest_undelivered_age_s"), AGES_S[9])
    assert within(actions.pop("oldest_pending_age_s"), 0)
    assert within(actions.pop("oldest_undelivered_age_s"), 0)
    for group in doc["groups"]:
        for consumer in group["consumers"]:
            assert 0 <= consumer.pop("idle_s") <= elapsed_s
            assert "inactive_s" not in consumer  # Redis 7.2+ only; these servers are older
    assert within(doc["outbox"].pop("oldest_age_s"), 0)
    assert doc == expected_document(keys)


@pytest.mark.slow
async def test_lag_json_reports_every_field(
    any_redis: Redis,
    any_redis_url: str,
    pool: AsyncConnectionPool[Any],
    database_url: str,
    prefix: str,
) -> None:
    keys = Keys(prefix)
    started = time.monotonic()
    await make_known_state(any_redis, pool, keys)
    result = await govflow(govflow_env(any_redis_url, database_url, prefix), "lag", "--json")
    assert result.returncode == 0, result.stderr.decode()
    check_document(json.loads(result.stdout), keys, time.monotonic() - started + 1)


async def test_python_api_matches_the_json(
    any_redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix)
    started = time.monotonic()
    await make_known_state(any_redis, pool, keys)
    report = await read_lag(any_redis, pool, keys)
    doc = json.loads(msgspec.json.encode(report))
    check_document(doc, keys, time.monotonic() - started + 1)


async def test_redis_7_lag_is_used_when_valid_and_counted_when_null(
    any_redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix)
    await make_known_state(any_redis, pool, keys)
    infos = {g["name"]: g for g in await any_redis.xinfo_groups(keys.events())}
    version = (await any_redis.info("server"))["redis_version"]
    if int(version.split(".")[0]) >= 7:
        # The deletion ahead of "triggers" and the arbitrary start of "audit": no lag.
        assert infos[b"triggers"]["lag"] is None
        assert infos[b"audit"]["lag"] is None
        [actions] = await any_redis.xinfo_groups(keys.commands())
        assert actions["lag"] == 3  # reported, and what govflow shows
    else:
        assert "lag" not in infos[b"triggers"]  # 6.2 has no such field
    report = await read_lag(any_redis, None, keys)
    assert [(g.group, g.lag, g.lag_valid) for g in report.groups] == [
        ("triggers", 3, True),
        ("audit", 1, True),
        ("actions", 3, True),
    ]


async def test_lag_beyond_the_scan_limit_is_an_estimate(
    any_redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix)
    await make_known_state(any_redis, pool, keys)
    report = await read_lag(any_redis, None, keys, scan_limit=1)
    triggers = report.groups[0]
    assert triggers.group == "triggers"
    assert not triggers.lag_valid
    assert 3 <= triggers.lag <= triggers.length  # never the "0" an exporter would show
    # Counting the delivered side instead keeps it exact when that side is short.
    audit = (await read_lag(any_redis, None, keys, scan_limit=2)).groups[1]
    assert (audit.group, audit.lag, audit.lag_valid) == ("audit", 1, True)


async def test_missing_streams_and_groups_are_not_errors(any_redis: Redis, prefix: str) -> None:
    keys = Keys(prefix)
    empty = await read_lag(any_redis, None, keys)
    assert [(g.stream, g.group, g.length, g.lag, g.pending) for g in empty.groups] == [
        (keys.events(), "triggers", 0, 0, 0),
        (keys.commands(), "actions", 0, 0, 0),
    ]
    assert (empty.retry_scheduled, empty.dead_letters, empty.outbox) == (0, 0, None)

    # Published before any worker ran: no group yet, every entry still to deliver.
    await any_redis.xadd(keys.events(), {"event": "{}"})
    await any_redis.xadd(keys.events(), {"event": "{}"})
    await any_redis.xadd(keys.dead(), {"error": "x"})
    report = await read_lag(any_redis, None, keys)
    events = report.groups[0]
    assert (events.group, events.length, events.lag, events.lag_valid) == ("triggers", 2, 2, True)
    assert events.oldest_undelivered_age_s is not None
    assert report.dead_letters == 1  # without a pool: the dead-letter stream's length


async def test_every_partition_is_reported(any_redis: Redis, prefix: str) -> None:
    keys = Keys(prefix, partitions=3)
    await any_redis.xadd(keys.events(2), {"event": "{}"})
    await any_redis.zadd(keys.retry(1), {"r": 1})
    report = await read_lag(any_redis, None, keys)
    assert [(g.stream, g.lag) for g in report.groups] == [
        (keys.events(0), 0),
        (keys.commands(0), 0),
        (keys.events(1), 0),
        (keys.commands(1), 0),
        (keys.events(2), 1),
        (keys.commands(2), 0),
    ]
    assert report.retry_scheduled == 1


def sampler(report: LagReport | None, *, fresh: bool = True) -> CollectorRegistry:
    """A registry holding only the collector of ``report``, as one scrape of the API sees it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LagCollector(report, fresh=fresh))
    return registry


async def test_gauges_follow_the_report(
    redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix)
    await make_known_state(redis, pool, keys)
    registry = sampler(await read_lag(redis, pool, keys))

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    labels = {"stream": keys.events(), "group": "triggers"}
    assert sample("govflow_lag_fresh") == 1
    assert sample("govflow_group_lag", **labels) == 3
    assert sample("govflow_group_lag_valid", **labels) == 1
    assert sample("govflow_group_pending", **labels) == 3
    assert (sample("govflow_group_oldest_pending_age_seconds", **labels) or 0) >= AGES_S[2]
    assert (sample("govflow_group_oldest_undelivered_age_seconds", **labels) or 0) >= AGES_S[6]
    assert sample("govflow_stream_length", stream=keys.events()) == 7
    assert sample("govflow_retry_scheduled") == 2
    assert sample("govflow_dead_letters_open") == 1
    assert sample("govflow_outbox_waiting") == 2
    assert sample("govflow_overdue", kind="execution") == 0
    assert sample("govflow_workers", role="actions", state="live") == 0

    await redis.xgroup_destroy(keys.events(), "audit")
    registry = sampler(await read_lag(redis, pool, keys))
    assert sample("govflow_group_lag", stream=keys.events(), group="audit") is None


async def test_without_a_report_only_freshness_is_exported() -> None:
    """Before the first read that succeeded, there is nothing to repeat: no figure at all."""
    registry = sampler(None, fresh=False)
    assert registry.get_sample_value("govflow_lag_fresh") == 0
    assert registry.get_sample_value("govflow_retry_scheduled") is None


@pytest.mark.slow
def test_watch_redraws_until_ctrl_c(redis_server_url: str, database_url: str, prefix: str) -> None:
    """On a terminal, ``--watch`` draws the table, and Ctrl-C ends it with status 0."""
    env = {
        **govflow_env(redis_server_url, database_url, prefix),
        "TERM": "xterm",
        "COLUMNS": "160",
    }
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "govflow.cli", "lag", "--watch", "--interval", "0.2"],
        env=env,
        cwd=ROOT,
        stdin=follower,
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    try:
        seen = _read_until(leader, b"dead letters", deadline_s=60)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=30)
        seen += _drain(leader)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert b"triggers" in seen
    assert f"{prefix}:events".encode() in seen


def _read_until(fd: int, marker: bytes, deadline_s: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + deadline_s
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} in {seen[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            seen += os.read(fd, 65536)
    return seen


def _drain(fd: int) -> bytes:
    seen = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        seen += chunk
    return seen
