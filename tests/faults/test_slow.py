"""Slow consumers: a webhook that stalls longer than ``GOVFLOW_CLAIM_IDLE``.

While a worker is alive its lease renewal keeps the entries in hand, so a slow receiver
costs time and nothing else: no other worker takes them over, nothing is delivered twice.
When the stall outlasts the lease (here the whole worker process is frozen with SIGSTOP,
as a long GC pause or a suspended VM would freeze it), another worker claims the entries
and runs them again: the webhook is then delivered twice with one Idempotency-Key, and
every effect in Postgres still happens once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import pytest

from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    CLAIM_IDLE,
    EVENTS,
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    record,
    settle,
)
from tests.faults.receiver import Receiver, receiving
from tests.faults.servers import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

STALL = CLAIM_IDLE + 1.5  # longer than the claim idle time: only the lease keeps the entry
SLOW_EVERY = 250  # one event in this many goes to the stalling path

REVIEW = """
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - assign: {assignee: risk-team}
"""
NOTIFY = """
name: notify
entity: policy
trigger: create
when: [{field: hook, in: [slow, fast]}]
actions:
  - notify: {webhook: "URL/{data.hook}", message: "{data.title} needs review"}
  - create_approval: {approvers: [compliance-officer]}
"""


def workflows(receiver: Receiver) -> list[str]:
    return [REVIEW, NOTIFY.replace("URL", receiver.url(""))]


def notify_events(n: int, tag: str) -> tuple[list[Event], dict[str, frozenset[str]]]:
    """Policies to review; one in ten also notifies a webhook, one in 250 a stalling one."""
    events, wants = [], {}
    for i in range(n):
        hook = "slow" if i % SLOW_EVERY == 0 else "fast" if i % 10 == 0 else None
        event = new_event(
            "policy.created", f"POL-{tag}-{i}", data={"title": f"Policy {i}", "hook": hook}
        )
        events.append(event)
        wants[event.id] = frozenset({"review", "notify"} if hook else {"review"})
    return events, wants


async def wait_until(condition: object, what: str, within: float, workers: Workers) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert workers.crashed() == [], workers.tail()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}\n{workers.tail()}")
        await anyio.sleep(0.05)


async def test_a_stall_longer_than_the_claim_idle_time_keeps_its_lease(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    events, wants = notify_events(EVENTS, "slow")
    slow = sum(1 for e in events if e.data["hook"] == "slow")
    with receiving(lambda path, key, n: STALL if path == "/slow" else 0.0) as hooks:
        await apply_workflows(fault_database_url, workflows(hooks))
        workers = Workers(fault_redis.url, fault_database_url, logs)
        producer = Producer(fault_redis.url, Keys(PREFIX), chunk=100, pause=0.05)
        try:
            for slot in range(2):
                workers.start(slot)
            await producer.run(events)
            report = await settle(
                fault_redis.url,
                fault_database_url,
                expected_of(producer.accepted, wants),
                within=180,
                deliveries=hooks.deliveries,
            )
            assert workers.crashed() == [], workers.tail()
        finally:
            workers.stop_all()
    record(
        "slow consumer, lease renewed",
        len(events),
        f"{slow} webhooks stalled {STALL} s (claim idle {CLAIM_IDLE} s)",
        report,
        started,
    )
    assert report.ok, f"{report.summary()}\n{workers.tail()}"
    # The lease held: no stalled delivery was claimed and made again by another worker.
    assert hooks.count("/slow") == slow
    assert report.webhook_redeliveries == 0
    assert report.redelivered == 0


async def test_a_stall_that_outlasts_the_lease_is_claimed_and_still_takes_effect_once(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    events, wants = notify_events(EVENTS, "frozen")

    def stall(path: str, key: str, n: int) -> float:
        return STALL if path == "/slow" and n == 1 else 0.0  # only the first delivery stalls

    with receiving(stall) as hooks:
        await apply_workflows(fault_database_url, workflows(hooks))
        # One consumer per group in the first worker, so that the stalled batch is its all.
        first = Workers(fault_redis.url, fault_database_url, logs, concurrency=1)
        second = Workers(fault_redis.url, fault_database_url, logs)
        producer = Producer(fault_redis.url, Keys(PREFIX), chunk=100, pause=0.0)
        try:
            frozen = first.start(0)
            await producer.run(events)
            await wait_until(lambda: hooks.count("/slow") >= 1, "a stalled delivery", 120, first)
            frozen.send_signal(signal.SIGSTOP)  # the stall now outlasts the lease
            try:
                second.start(1)
                await wait_until(
                    lambda: _delivered_twice(hooks), "another worker to claim", 120, second
                )
            finally:
                frozen.send_signal(signal.SIGCONT)
            report = await settle(
                fault_redis.url,
                fault_database_url,
                expected_of(producer.accepted, wants),
                within=150,
                deliveries=hooks.deliveries,
            )
            assert first.crashed() == [], first.tail()
            assert second.crashed() == [], second.tail()
        finally:
            first.stop_all()
            second.stop_all()
    record(
        "slow consumer, lease lost",
        len(events),
        f"worker frozen (SIGSTOP) in a {STALL} s webhook stall; another worker claimed",
        report,
        started,
    )
    assert report.ok, f"{report.summary()}\n{first.tail()}"
    # The claimed work ran twice: at least once delivery, exactly once in effect.
    assert report.webhook_redeliveries >= 1
    assert report.redelivered >= 1


def _delivered_twice(hooks: Receiver) -> bool:
    return any(len(bodies) > 1 for bodies in hooks.deliveries().values())
