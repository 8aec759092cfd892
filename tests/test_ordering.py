"""Per-entity order: the sequencer's rounds, and a retry holding an entity's later events.

The pipeline test runs on the suite's single Redis with 2 partitions (leased), so it runs
in every CI run; tests/cluster runs the same on a Redis Cluster with three workers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.consumers.ordering import Sequencer
from govflow.consumers.streams import Hold
from govflow.operations.lag import GroupLag, LagReport, read_lag
from govflow.producers.publish import Publisher
from govflow.schemas.events import Change, new_event
from govflow.schemas.settings import Settings
from tests.cluster.helpers import drained
from tests.pipeline_helpers import apply, fetch, running_worker, statuses, wait_for
from tests.webhook_server import Reply, serve


def run_rounds(sequencer: Sequencer, kinds: dict[int, str]) -> list[list[int]]:
    """The rounds a sequencer gives when entry ``i`` ends with ``kinds.get(i, "ack")``."""
    rounds = []
    while part := sequencer.next_round():
        rounds.append(part)
        for index in part:
            sequencer.ended(index, kinds.get(index, "ack"))
    return rounds


def test_one_entitys_entries_run_one_round_after_another() -> None:
    holds = [Hold("A", "1"), Hold("B", "2"), None, Hold("A", "4"), Hold("A", "5")]
    sequencer = Sequencer(holds, {})
    assert run_rounds(sequencer, {}) == [[0, 1, 2], [3], [4]]
    assert sequencer.parked == set()


def test_a_retry_parks_the_rest_of_its_entity_only() -> None:
    holds = [Hold("A", "1"), Hold("B", "2"), Hold("A", "3"), Hold("B", "4"), Hold("A", "5")]
    sequencer = Sequencer(holds, {})
    assert run_rounds(sequencer, {0: "retry", 1: "dead"}) == [[0, 1], [3]]
    assert sequencer.parked == {2, 4}


def test_a_fenced_entry_leaves_the_rest_of_its_entity_neither_run_nor_parked() -> None:
    holds = [Hold("A", "1"), Hold("B", "2"), Hold("A", "3"), Hold("B", "4"), Hold("A", "5")]
    sequencer = Sequencer(holds, {})
    assert run_rounds(sequencer, {0: "fenced"}) == [[0, 1], [3]]
    assert sequencer.left == {2, 4}
    assert sequencer.parked == set()


def test_a_held_entity_runs_only_the_entry_in_front() -> None:
    holds = [Hold("A", "9"), Hold("A", "1"), Hold("A", "3"), Hold("B", "4")]
    sequencer = Sequencer(holds, {"A": "1", "B": "7"})
    assert run_rounds(sequencer, {}) == [[1]]
    assert sequencer.fronts == {1}
    assert sequencer.parked == {0, 2, 3}


WORKFLOW = """
name: ordered
entity: policy
trigger: status_change
ordering: entity
actions:
  - notify: {{webhook: "http://127.0.0.1:{port}/h/{{entity_id}}/{{data.seq}}"}}
"""


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_retried_status_change_holds_back_the_later_ones(
    make_settings: Callable[..., Settings], redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    settings = make_settings(partitions=2, lease_ttl=3.0, backoff_base=1.0)
    keys = settings.keys()
    with serve() as hooks:
        for seq in range(1, 6):
            for entity in ("POL-A", "POL-B"):
                flaky = entity == "POL-A" and seq == 2  # fails twice, then succeeds
                replies = [Reply(500), Reply(503), Reply(200)] if flaky else [Reply(200)]
                hooks.plan(f"/h/{entity}/{seq}", *replies)
        await apply(pool, WORKFLOW.format(port=hooks.port))
        events = [
            new_event(
                "policy.status_changed",
                entity,
                data={"seq": seq},
                changes={"status": Change(from_=str(seq - 1), to=str(seq))},
            )
            for seq in range(1, 6)
            for entity in ("POL-A", "POL-B")
        ]
        async with running_worker(settings):
            await Publisher(redis, keys).publish_many(events)
            # While POL-A's change 2 waits for its retry, `govflow lag` shows what waits
            # behind it: one held entity, its later changes parked.
            commands = keys.commands(keys.partition_of("POL-A"))
            held = await wait_for(
                lambda: _actions_of(read_lag(redis, None, keys), commands),
                lambda g: g.held_entities == 1 and g.parked >= 1,
                within=20,
                what="POL-A held, its later changes parked",
            )
            assert held.parked <= 3
            await wait_for(lambda: statuses(pool), lambda s: s == {"completed": 10}, within=60,
                           what="10 executions completed")  # fmt: skip
            await wait_for(lambda: drained(redis, keys), bool, within=20, what="nothing held")
        order: dict[str, list[int]] = {}
        for request in hooks.received:
            _, _, entity, step = request.path.split("/")
            order.setdefault(entity, []).append(int(step))
    # POL-A's 3, 4 and 5 waited for its retried 2; POL-B never waited for POL-A.
    assert order["POL-A"] == [1, 2, 2, 2, 3, 4, 5]
    assert order["POL-B"] == [1, 2, 3, 4, 5]
    attempts = await fetch(
        pool, "SELECT entity_id, max(attempts) FROM workflow_executions GROUP BY 1"
    )
    assert dict(attempts) == {"POL-A": 3, "POL-B": 1}, "a parked entry counted an attempt"


async def _actions_of(report: Awaitable[LagReport], stream: str) -> GroupLag:
    return next(g for g in (await report).groups if (g.stream, g.group) == (stream, "actions"))
