"""Control fields only from govflow, and a bound on the executions one root event causes.

A producer may write ``attempt``, ``hold`` and ``replay_of`` on an entry: without govflow's
seal they are ignored, so a producer's ``attempt`` cannot make a first failure final. A
chain of ``change_status`` workflows is bounded in depth and in breadth: past
``GOVFLOW_MAX_CHAIN_EXECUTIONS`` executions for one root event, chained events are
dead-lettered with the reason.
"""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.consumers.seal import SEAL_FIELD
from govflow.consumers.streams import (
    ATTEMPT_FIELD,
    EVENT_FIELD,
    HOLD_FIELD,
    REPLAY_FIELD,
    Streams,
    load_seal,
)
from govflow.schemas.codec import encode
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from tests.pipeline_helpers import (
    apply,
    fetch,
    publish,
    running_worker,
    scalar,
    stream_state,
    wait_for,
)

pytestmark = pytest.mark.anyio

GROUP = "triggers"
CONTROL = {ATTEMPT_FIELD: b"5", REPLAY_FIELD: b"17"}
HOLD = {HOLD_FIELD: b"1-1"}  # checked against the held hash instead (consumers.seal)


async def test_a_producers_control_fields_are_ignored_and_govflows_honoured(
    redis: Redis, prefix: str
) -> None:
    keys = Keys(prefix, 1)
    seal = await load_seal(redis, keys)
    assert seal is not None
    assert await load_seal(redis, keys, create=False) is not None  # the operator's read
    streams = Streams(redis, seal)
    event = {EVENT_FIELD: encode(new_event("policy.created", "P1"))}
    await streams.ensure_group(keys.events(), GROUP)
    sealed = streams.sealed({**event, **CONTROL})
    forged = {**event, **CONTROL, **HOLD, SEAL_FIELD: b"0" * 64}
    moved = {**sealed, EVENT_FIELD: encode(new_event("policy.created", "P2"))}
    for fields in ({**event, **CONTROL}, forged, moved, sealed):
        await redis.xadd(keys.events(), fields)  # type: ignore[arg-type]
    producer, forgery, transplant, govflow = await streams.read(keys.events(), GROUP, "w1", 10, 100)
    for entry in (producer, forgery, transplant):
        assert entry.attempt == 1
        assert set(entry.fields) - {HOLD_FIELD} == {EVENT_FIELD}
        assert entry.field(REPLAY_FIELD) is None
    assert govflow.attempt == 5
    assert govflow.fields == {**event, **CONTROL}
    assert SEAL_FIELD.decode() not in govflow.payload()


CHAIN = """
name: chain-{name}
entity: policy
trigger: status_change
actions:
  - change_status: {{to: {name}}}
"""


@pytest.mark.slow
async def test_a_chain_is_bounded_in_breadth_by_executions_per_root(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    """Two workflows that each change the status again: 2, 4, 8 ... executions per level."""
    bound = 5
    settings = make_settings(max_chain_executions=bound)
    for name in ("a", "b"):
        await apply(pool, CHAIN.format(name=name))
    root = new_event("policy.status_changed", "P1", changes={"status": {"from": "x", "to": "y"}})  # type: ignore[dict-item]
    async with running_worker(settings, frozenset({"triggers", "actions", "relay"})):
        await publish(redis, settings.keys(), [root])
        await wait_for(
            lambda: fetch(
                pool, "SELECT count(*) FROM dead_letters WHERE error LIKE %s", "%CHAIN_EXE%"
            ),
            lambda rows: rows[0][0] > 0,
            within=30,
            what="a chained event refused",
        )
        await wait_for(
            lambda: stream_state(redis, settings.keys()),
            lambda s: s["triggers_pending"] == s["actions_pending"] == s["retry_scheduled"] == 0,
            within=30,
            what="nothing in flight",
        )
    counted = await scalar(
        pool, "SELECT executions FROM chain_executions WHERE root_id = %s", root.id
    )
    chained = await scalar(
        pool, "SELECT count(*) FROM workflow_executions WHERE event_id <> %s", root.id
    )
    # Level 1: two chained events, four executions; each level-2 event would make it six.
    assert chained == counted == 4
    assert await scalar(pool, "SELECT count(*) FROM workflow_executions") == chained + 2
    unfinished = await scalar(
        pool, "SELECT count(*) FROM workflow_executions WHERE status <> 'completed'"
    )
    assert unfinished == 0


async def test_a_sealed_entry_with_bytes_that_are_not_text_keeps_its_seal_when_moved(
    redis: Redis, prefix: str
) -> None:
    """Retries travel through Lua as text: the seal is over that text, so an odd byte in
    a field cannot strip an entry's attempt and retry it for ever."""
    keys = Keys(prefix, 1)
    seal = await load_seal(redis, keys)
    assert seal is not None
    streams = Streams(redis, seal)
    await streams.ensure_group(keys.events(), GROUP)
    fields = {EVENT_FIELD: b"{}", b"extra": b"\xff\xfe", ATTEMPT_FIELD: b"3"}
    member = encode({"to": "events", "fields": [x.decode() for kv in
                     streams.sealed(fields).items() for x in kv]})  # fmt: skip
    await redis.zadd(keys.retry(), {member.decode(): 0})
    await streams.move_due(keys.retry(), keys.events(), keys.commands(), keys.dead())
    (entry,) = await streams.read(keys.events(), GROUP, "w1", 10, 100)
    assert entry.attempt == 3
