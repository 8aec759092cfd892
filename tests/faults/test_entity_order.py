"""Per-entity order under worker SIGKILLs: an entity's events run in publish order.

A workflow with ``ordering: entity`` on 4 partitions (README.md, "Partitions, Redis
Cluster and per-entity order"). Each entity's events are published in order, interleaved
with other entities' at random, while three workers are SIGKILLed again and again with
entries in hand. A dead worker's partitions go to another once its leases lapse; the new
owner must run the entries it left pending before any later entry of theirs.

Order is read back twice. From outside: each execution's webhook (the receiver holds it
a moment, so that kills land mid-execution) reaches the receiver after every delivery of
the entity's earlier events, a redelivery included. From Postgres: each execution
commits in a transaction that starts only after the previous execution of its entity
committed, so ``finished_at`` (the commit's ``now()``) strictly rises along each entity's
events.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import pytest
from psycopg import AsyncConnection

from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    kill_at_work,
    record,
    settle,
    wait_started,
)
from tests.faults.receiver import receiving
from tests.faults.servers import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

ENTITIES = 50
PER_ENTITY = 8
PARTITIONS = 4
LEASE_TTL = "1.5"
KILLS = 8
WORKERS = 3
STALL = 0.1  # seconds the receiver holds each webhook


SEQUENCE = """
name: sequence
entity: policy
trigger: update
ordering: entity
actions:
  - create_task: {title: "Step {data.seq} of {entity_id}"}
  - notify: {webhook: "URL/{entity_id}/{data.seq}", message: "{entity_id} step {data.seq}"}
  - assign: {assignee: "owner-{data.seq}"}
"""


def entity_events(tag: str) -> tuple[list[Event], dict[str, tuple[str, int]]]:
    """``PER_ENTITY`` updates of each entity, in order per entity, interleaved at random;
    and each event's (entity, place in its entity's order)."""
    turns = [e for e in range(ENTITIES) for _ in range(PER_ENTITY)]
    random.shuffle(turns)
    seen: dict[int, int] = defaultdict(int)
    events: list[Event] = []
    place: dict[str, tuple[str, int]] = {}
    for e in turns:
        entity, seq = f"POL-{tag}-{e}", seen[e]
        seen[e] += 1
        event = new_event("policy.updated", entity, data={"seq": seq})
        events.append(event)
        place[event.id] = (entity, seq)
    return events, place


async def out_of_order(database_url: str, place: dict[str, tuple[str, int]]) -> list[str]:
    """Each pair of one entity's consecutive events whose executions did not finish in
    publish order (read back from the executions' commit times)."""
    async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT event_id, finished_at FROM workflow_executions WHERE status = 'completed'"
        )
        finished: dict[str, datetime] = dict(await cur.fetchall())
    by_entity: dict[str, list[tuple[int, datetime]]] = defaultdict(list)
    for event_id, moment in finished.items():
        entity, seq = place[event_id]
        by_entity[entity].append((seq, moment))
    wrong = []
    for entity, runs in sorted(by_entity.items()):
        runs.sort()
        for (seq, at), (later, then) in pairwise(runs):
            if then <= at:
                wrong.append(f"{entity}: event {later} finished at {then}, event {seq} at {at}")
    return wrong


class Arrivals:
    """The webhooks' paths (``/<entity>/<seq>``) in the order they reached the receiver."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def stall(self, path: str, key: str, n: int) -> float:
        self.paths.append(path)  # one list.append: safe from the receiver's threads
        return STALL

    def out_of_order(self) -> list[str]:
        """Each delivery that reached the receiver after a later event of its entity's."""
        latest: dict[str, int] = {}
        wrong = []
        for path in self.paths:
            entity, seq = path.strip("/").rsplit("/", 1)
            if int(seq) < latest.get(entity, -1):
                wrong.append(f"{entity}: webhook {seq} after webhook {latest[entity]}")
            latest[entity] = max(int(seq), latest.get(entity, -1))
        return wrong


async def test_an_entitys_events_run_in_publish_order_while_workers_are_killed(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    keys = Keys(PREFIX, PARTITIONS)
    events, place = entity_events("order")
    wants = {event.id: frozenset({"sequence"}) for event in events}
    arrivals = Arrivals()
    with receiving(arrivals.stall) as hooks:
        await apply_workflows(fault_database_url, [SEQUENCE.replace("URL", hooks.url(""))])
        workers = Workers(
            fault_redis.url, fault_database_url, logs, log_level="info",
            GOVFLOW_PARTITIONS=str(PARTITIONS), GOVFLOW_LEASE_TTL=LEASE_TTL,
        )  # fmt: skip
        producer = Producer(fault_redis.url, keys, chunk=20, pause=0.15)
        try:
            for slot in range(WORKERS):
                workers.start(slot)
            await wait_started(workers)
            in_work = await kill_at_work(
                fault_redis.url, workers, producer, events, KILLS, keys=keys
            )
            report = await settle(
                fault_redis.url,
                fault_database_url,
                expected_of(producer.accepted, wants),
                within=120,
                deliveries=hooks.deliveries,
                keys=keys,
            )
            assert workers.crashed() == [], workers.tail()
        finally:
            workers.stop_all()
    wrong = await out_of_order(fault_database_url, place) + arrivals.out_of_order()
    record(
        "per-entity order under worker SIGKILL",
        len(events),
        f"{ENTITIES} entities x {PER_ENTITY} events, `ordering: entity`, {PARTITIONS}"
        f" partitions ({LEASE_TTL} s leases), webhooks held {STALL} s; {workers.killed}"
        f" SIGKILLs of {WORKERS} workers, {in_work} with entries in hand; out of order: {len(wrong)}",
        report,
        started,
    )
    assert len(producer.accepted) == len(events)
    # Kills stop early once every event is in (kill_at_work): on a slow machine, fewer.
    assert in_work >= 2, f"only {in_work} kills caught a worker at work"
    assert report.ok, f"{report.summary()}\n{workers.tail()}"
    assert wrong == [], "\n".join(wrong[:20])
