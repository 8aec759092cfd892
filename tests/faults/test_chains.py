"""change_status chains, the outbox and the relay under SIGKILLs and Redis restarts.

Each root event starts ``escalate``, whose ``change_status`` step writes a chained
``status_changed`` event to the outbox in the step's transaction; the relay publishes it
and it starts ``on-review``, which changes the status again and starts ``on-approved``:
three executions and two chained events per root. Three ``govflow run --role all``
workers (each a relay too, one of them leading) are SIGKILLed while they hold entries,
the relay leader among them, and Redis is restarted (AOF on) under them.

Every chain must finish once: one chained event per ``change_status`` step (one outbox
row, one id), one execution per (event, workflow), each root's chain counted once
against ``GOVFLOW_MAX_CHAIN_EXECUTIONS`` (set to exactly the two it needs, so a count
taken twice would dead-letter), and the outbox drained: every row published and its
event taken up.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import pytest
from psycopg import AsyncConnection

from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    jitter,
    kill_one,
    record,
    scalar,
    settle,
    wait_started,
    wait_until,
)
from tests.faults.invariants import Expected
from tests.faults.servers import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

ROOTS = 200
WORKERS = 3
ROUNDS = 9  # faults, in turn: the relay leader killed, a worker killed, Redis restarted
CHAINED = 2  # chained events (and chained executions) per root
RECONCILE_AFTER = "3"

WORKFLOWS = (
    """
name: escalate
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - change_status: {to: in-review}
""",
    """
name: on-review
entity: policy
trigger: status_change
when: [{field: status, equals: in-review}]
actions:
  - assign: {assignee: reviewer}
  - change_status: {to: approved}
""",
    """
name: on-approved
entity: policy
trigger: status_change
when: [{field: status, equals: approved}]
actions:
  - create_approval: {approvers: [compliance-officer]}
""",
)
# The workflow a chained event of each depth starts.
AT_DEPTH = {1: "on-review", 2: "on-approved"}


def roots(n: int) -> list[Event]:
    return [
        new_event("policy.created", f"POL-chain-{i}", data={"title": f"Policy {i}"})
        for i in range(n)
    ]


async def chained_events(database_url: str) -> dict[str, list[str]]:
    """The ids of the chained events in the outbox, by the event that caused them."""
    async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT event ->> 'causation_id', event ->> 'id' FROM outbox ORDER BY id"
        )
        children: dict[str, list[str]] = defaultdict(list)
        for cause, event_id in await cur.fetchall():
            children[cause].append(event_id)
        return children


def expect_chains(database_url: str, accepted: Sequence[str]) -> Callable[[], Awaitable[Expected]]:
    """What the checker expects, as far as the chains have come: each root runs
    ``escalate`` and each chained event its depth's workflow. A chained event still
    missing stands in under a made-up id, so that it counts as an execution lost."""

    async def expected() -> Expected:
        children = await chained_events(database_url)
        workflows = {root: frozenset({"escalate"}) for root in accepted}
        causes = list(accepted)
        for depth in range(1, CHAINED + 1):
            found = []
            for cause in causes:
                for child in children.get(cause) or [f"{cause}/chained"]:
                    workflows[child] = frozenset({AT_DEPTH[depth]})
                    found.append(child)
            causes = found
        return Expected(workflows=workflows)

    return expected


class Faults:
    """The faults of one run, in turn, and how many of each landed."""

    def __init__(self, redis: RedisServer, workers: Workers) -> None:
        self.redis = redis
        self.workers = workers
        self.relay_kills = 0
        self.worker_kills = 0  # of those that held entries

    async def kill_relay_leader(self) -> None:
        """SIGKILL the worker whose relay leads (waiting up to 3 s for one to lead)."""
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            slot = next((s for s in self.workers.alive() if leads(self.workers, s)), None)
            if slot is not None:
                self.workers.kill(slot)
                self.workers.start(slot)
                self.relay_kills += 1
                return
            await anyio.sleep(0.05)

    async def kill_a_worker_at_work(self) -> None:
        self.worker_kills += await kill_one(self.redis.url, self.workers, within=2.0)

    async def restart_redis(self) -> None:
        await anyio.to_thread.run_sync(functools.partial(self.redis.restart, jitter(0.2, 1.0)))

    async def run(self, rounds: int) -> None:
        turns = (self.kill_relay_leader, self.kill_a_worker_at_work, self.restart_redis)
        for n in range(rounds):
            await anyio.sleep(jitter(0.3, 0.8))
            await turns[n % len(turns)]()


def leads(workers: Workers, slot: int) -> bool:
    """Whether the worker of ``slot`` said last that its relay leads."""
    text = workers.log_of[slot].read_bytes()
    return text.rfind(b'"relay.leading"') > text.rfind(b'"relay.standby"')


async def test_change_status_chains_finish_once_through_relay_kills_and_redis_restarts(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    await apply_workflows(fault_database_url, WORKFLOWS)
    events = roots(ROOTS)
    workers = Workers(
        fault_redis.url, fault_database_url, logs, roles="all", log_level="info",
        GOVFLOW_RECONCILE_AFTER=RECONCILE_AFTER,
        GOVFLOW_MAX_CHAIN_EXECUTIONS=str(CHAINED),
    )  # fmt: skip
    producer = Producer(fault_redis.url, Keys(PREFIX), chunk=10, pause=0.15)
    faults = Faults(fault_redis, workers)
    try:
        for slot in range(WORKERS):
            workers.start(slot)
        await wait_started(workers)
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer.run, events)
            await faults.run(ROUNDS)
        report = await settle(
            fault_redis.url,
            fault_database_url,
            expect_chains(fault_database_url, producer.accepted),
            within=120,
        )

        async def drained() -> bool:
            left = "SELECT count(*) FROM outbox WHERE published_at IS NULL OR taken_at IS NULL"
            return bool(await scalar(fault_database_url, left) == 0)

        await wait_until("the outbox drained", drained, within=30)
        assert workers.crashed() == [], workers.tail()
    finally:
        workers.stop_all()
    children = await chained_events(fault_database_url)
    counted = await scalar(
        fault_database_url,
        f"SELECT count(*) FROM chain_executions WHERE executions = {CHAINED}",
    )
    record(
        "change_status chains through the outbox",
        ROOTS * (1 + CHAINED),
        f"{ROOTS} roots, each a chain of {CHAINED} status changes through the outbox and the"
        f" relay; {workers.killed} SIGKILLs of {WORKERS} workers (role all):"
        f" {faults.relay_kills} of the relay leader, {faults.worker_kills} of a worker"
        f" holding entries; {fault_redis.kills} Redis restarts;"
        f" GOVFLOW_MAX_CHAIN_EXECUTIONS={CHAINED}",
        report,
        started,
    )
    assert len(producer.accepted) == ROOTS
    assert report.ok, f"{report.summary()}\n{workers.tail()}"
    # One chained event per change_status step: no step wrote a second one.
    assert sum(len(ids) for ids in children.values()) == ROOTS * CHAINED
    assert all(len(ids) == 1 for ids in children.values())
    assert counted == ROOTS  # every root's chain counted once, at exactly its size
    assert faults.relay_kills == ROUNDS // 3, "a turn found no relay leading"
    assert fault_redis.kills == ROUNDS // 3
