"""Entries govflow cannot store or script are refused at decode; every script is atomic.

NUL in any string (Postgres text and jsonb cannot store it) and more fields than the
wire format has are refused when the entry is decoded: the bad entry alone is
dead-lettered, on the stream and in the table, and its batch neighbours run once. Every
Lua script checks its inputs before it writes, so one it refuses changed nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from govflow.consumers import scripts
from govflow.consumers.streams import COMMAND_FIELD, EVENT_FIELD, Streams
from govflow.schemas.codec import encode
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from tests.faults.receiver import receiving
from tests.pipeline_helpers import (
    add_entry,
    apply,
    entries,
    fetch,
    publish,
    running_worker,
    stream_state,
    wait_for,
)

pytestmark = pytest.mark.anyio

NEIGHBOURS = 6


def workflow(url: str) -> str:
    return f"""
name: notify-each
entity: policy
trigger: create
actions:
  - create_task: {{title: "Review {{data.title}}"}}
  - notify: {{webhook: "{url}", message: "{{data.title}}"}}
"""


def with_nul(event_json: bytes) -> bytes:
    """The same event with a NUL in its data's title (as JSON escapes it)."""
    return event_json.replace(b'"title":"', b'"title":"bad\\u0000', 1)


async def finished(pool: AsyncConnectionPool[Any]) -> list[tuple[Any, ...]]:
    return await fetch(pool, "SELECT status FROM workflow_executions")


@pytest.mark.slow
async def test_a_nul_in_an_event_or_a_command_dead_letters_it_alone(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    settings = make_settings()
    keys = settings.keys()
    with receiving() as hooks:
        await apply(pool, workflow(hooks.url("/hook")))
        events = [
            new_event("policy.created", f"P{i}", data={"title": f"t{i}"}) for i in range(NEIGHBOURS)
        ]
        await publish(redis, keys, events[:3])
        await add_entry(redis, keys.events(), {EVENT_FIELD: with_nul(encode(events[0]))})
        await publish(redis, keys, events[3:])
        # The matcher alone first: then a command with a NUL joins its neighbours' batch.
        async with running_worker(settings, frozenset({"triggers"})):
            await wait_for(
                lambda: redis.xlen(keys.commands()),
                lambda n: n == NEIGHBOURS,
                within=20,
                what="every good event's command",
            )
        (_, fields), *_ = await entries(redis, keys.commands())
        await add_entry(redis, keys.commands(), {COMMAND_FIELD: with_nul(fields[COMMAND_FIELD])})
        async with running_worker(settings, frozenset({"actions"})):
            rows = await wait_for(
                lambda: finished(pool),
                lambda rows: rows.count(("completed",)) == NEIGHBOURS,
                within=30,
                what="every neighbour completed",
            )
        assert len(rows) == NEIGHBOURS
        deliveries = hooks.deliveries()
    assert len(deliveries) == NEIGHBOURS
    assert all(len(bodies) == 1 for bodies in deliveries.values())  # once each
    letters = await fetch(pool, "SELECT stream, error FROM dead_letters ORDER BY id")
    assert [stream for stream, _ in letters] == [keys.events(), keys.commands()]
    assert all("NUL" in error for _, error in letters)
    assert await stream_state(redis, keys) == {
        "triggers_pending": 0,
        "actions_pending": 0,
        "retry_scheduled": 0,
        "dead_stream": 2,
    }


@pytest.mark.slow
async def test_an_entry_with_5001_fields_is_dead_lettered_with_its_event(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    settings = make_settings()
    keys = settings.keys()
    await apply(pool, workflow("http://127.0.0.1:9/unused").replace("  - notify", "  # -"))
    events = [new_event("policy.created", f"P{i}", data={"title": "t"}) for i in range(3)]
    await publish(redis, keys, events[:2])
    wide = {EVENT_FIELD: encode(events[2])} | {f"f{i}".encode(): b"x" for i in range(5000)}
    await add_entry(redis, keys.events(), wide)
    async with running_worker(settings):
        await wait_for(
            lambda: redis.xlen(keys.dead()), lambda n: n == 1, within=20, what="a dead letter"
        )
        await wait_for(
            lambda: finished(pool),
            lambda rows: rows == [("completed",)] * 2,
            within=20,
            what="both neighbours completed",
        )
    ((error, payload),) = await fetch(pool, "SELECT error, payload FROM dead_letters")
    assert "5001 fields" in error
    assert set(payload) == {"event"}  # the wire format's fields are kept, the rest dropped
    ((_, letter),) = await entries(redis, keys.dead())
    assert letter[b"payload.event"] == encode(events[2])
    assert (await stream_state(redis, keys))["triggers_pending"] == 0


GROUP = "actions"


async def one_pending(redis: Redis, keys: Keys) -> tuple[Streams, str]:
    streams = Streams(redis)
    await streams.ensure_group(keys.commands(), GROUP)
    await redis.xadd(keys.commands(), {"command": "c"})
    (entry,) = await streams.read(keys.commands(), GROUP, "w1", 10, 100)
    return streams, entry.id


def too_many(n: int = scripts.MAX_UNPACK + 2) -> dict[bytes, bytes]:
    return {f"f{i}".encode(): b"x" for i in range(n // 2)}


async def test_every_hand_over_script_refuses_oversized_input_before_it_writes(
    redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix, 1)
    streams, entry_id = await one_pending(redis, keys)
    stream = keys.commands()
    held = keys.held(GROUP)
    order = scripts.EntityOrder(
        entity="E", token=entry_id, held=held, parked=keys.parked(GROUP, "E")
    )
    calls = [
        scripts.acknowledge(
            stream=stream, group=GROUP, ids=[entry_id] * (scripts.MAX_UNPACK + 1), fence=None
        ),
        scripts.ack_and_dead_letter(
            stream=stream, group=GROUP, entry_id=entry_id, dead_stream=keys.dead(),
            letter={k.decode(): "x" for k in too_many()}, fence=None,
        ),
        scripts.ack_and_schedule_retry(
            stream=stream, group=GROUP, entry_id=entry_id, retry_set=keys.retry(),
            delay_ms=0, to="commands", fields=too_many(), fence=None, order=order,
        ),
        scripts.ack_and_park(
            stream=stream, group=GROUP, entry_id=entry_id, fields=too_many(), fence=None,
            order=order,
        ),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(redis_errors.ResponseError, match="govflow"):
            await streams.run(call)
        pending: Any = await redis.xpending(stream, GROUP)
        assert pending["pending"] == 1  # not acknowledged: the entry is still in hand
    assert await redis.xlen(keys.dead()) == 0
    assert await redis.zcard(keys.retry()) == 0
    assert await redis.exists(held, keys.parked(GROUP, "E")) == 0
    assert await redis.xlen(stream) == 1


async def test_a_retry_no_stream_can_take_is_dead_lettered_and_the_rest_move(
    redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix, 1)
    streams = Streams(redis)
    good = encode({"to": "commands", "fields": ["command", "c"]}).decode()
    wide = json.dumps({"to": "commands", "fields": ["f", "x"] * scripts.MAX_UNPACK})
    await redis.zadd(keys.retry(), {good: 1, "not json": 2, wide: 3})
    moved = await streams.move_due(keys.retry(), keys.events(), keys.commands(), keys.dead())
    assert moved == 3
    assert await redis.zcard(keys.retry()) == 0
    assert [f for _, f in await entries(redis, keys.commands())] == [{b"command": b"c"}]
    letters = await entries(redis, keys.dead())
    assert len(letters) == 2
    assert all(b"no stream can take" in f[b"error"] for _, f in letters)
