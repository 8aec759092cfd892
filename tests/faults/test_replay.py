"""A dead-letter replay under faults: each letter replayed once, each effect once.

A receiver answers ``410 Gone`` to every webhook: each event's ``notify-review``
execution is dead-lettered at its webhook step, after its first step took effect. Then
the receiver recovers and an operator runs ``govflow dlq replay --all`` (paced, so that
it is still at work), while a worker holding entries is SIGKILLed twice and Redis is
restarted under the replay. A replay that dies with Redis is run again, as an operator
would, until no letter is left open.

Every letter must end replayed exactly once (``replay_count`` 1) and none dead-lettered
anew; every execution completed, with each step's effect once (the first step, done
before the 410, is skipped, not done again); every webhook delivered with one body per
``Idempotency-Key``.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

import anyio
import pytest

from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    GOVFLOW,
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    jitter,
    kill_one,
    record,
    scalar,
    settle,
    wait_started,
    wait_until,
)
from tests.faults.receiver import receiving
from tests.faults.servers import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

EVENTS = 150
RATE = "40/s"  # the replay takes about 4 s: long enough to be hit
MAX_RUNS = 10
STALL = 0.2

WORKFLOWS = (
    """
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - assign: {assignee: risk-team}
""",
    """
name: notify-review
entity: policy
trigger: create
actions:
  - create_task: {title: "Tell the owner of {data.title}"}
  - notify: {webhook: "URL/hook", message: "{data.title} needs review"}
  - create_approval: {approvers: [compliance-officer]}
""",
)


class Receiver:
    """Answers 410 Gone at once until ``recover()``; then 200, after ``STALL`` seconds (so
    that the replayed executions are in hand long enough for a kill to find them)."""

    def __init__(self) -> None:
        self.gone = threading.Event()
        self.gone.set()

    def stall(self, path: str, key: str, n: int) -> float:
        return 0.0 if self.gone.is_set() else STALL

    def answer(self, path: str, key: str, n: int) -> int:
        return 410 if self.gone.is_set() else 200

    def recover(self) -> None:
        self.gone.clear()


class Replays:
    """``govflow dlq replay --all`` run until no letter is left open."""

    def __init__(self, workers: Workers, database_url: str) -> None:
        self.env = workers.env
        self.logs = workers.logs
        self.database_url = database_url
        self.codes: list[int] = []

    async def open_letters(self) -> int:
        left = "SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL AND purged_at IS NULL"
        return int(await scalar(self.database_url, left))

    async def run(self) -> None:
        while len(self.codes) < MAX_RUNS:
            args = [str(GOVFLOW), "dlq", "replay", "--all", "--rate", RATE, "--actor", "faults"]
            with (self.logs / f"replay-{len(self.codes) + 1}.log").open("wb") as out:
                done = await anyio.run_process(
                    args, env=self.env, stdout=out, stderr=out, check=False
                )
            self.codes.append(done.returncode)
            if not await self.open_letters():
                return
            await anyio.sleep(0.5)

    def output(self) -> str:
        return "\n".join(log.read_text() for log in sorted(self.logs.glob("replay-*.log")))


def policies(n: int) -> tuple[list[Event], dict[str, frozenset[str]]]:
    events = [
        new_event("policy.created", f"POL-replay-{i}", data={"title": f"Policy {i}"})
        for i in range(n)
    ]
    return events, {e.id: frozenset({"review", "notify-review"}) for e in events}


async def test_a_dead_letter_replay_under_kills_and_a_redis_restart_runs_each_letter_once(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    events, wants = policies(EVENTS)
    receiver = Receiver()
    with receiving(receiver.stall, receiver.answer) as hooks:
        await apply_workflows(
            fault_database_url, [w.replace("URL", hooks.url("")) for w in WORKFLOWS]
        )
        workers = Workers(fault_redis.url, fault_database_url, logs, log_level="info")
        replays = Replays(workers, fault_database_url)
        killed_at_work = 0
        try:
            for slot in range(2):
                workers.start(slot)
            await wait_started(workers)
            await Producer(fault_redis.url, Keys(PREFIX), chunk=50, pause=0).run(events)

            async def all_dead_lettered() -> bool:
                dead = "SELECT count(*) FROM dead_letters WHERE execution_id IS NOT NULL"
                return bool(await scalar(fault_database_url, dead) == EVENTS)

            await wait_until("every notify-review dead-lettered", all_dead_lettered)

            receiver.recover()
            async with anyio.create_task_group() as tg:
                tg.start_soon(replays.run)
                await anyio.sleep(0.5)
                killed_at_work += await kill_one(fault_redis.url, workers, within=3.0)
                await anyio.sleep(jitter(0.3, 0.8))
                await anyio.to_thread.run_sync(functools.partial(fault_redis.restart, 0.5))
                await anyio.sleep(jitter(0.3, 0.8))
                killed_at_work += await kill_one(fault_redis.url, workers, within=3.0)
            report = await settle(
                fault_redis.url,
                fault_database_url,
                expected_of([e.id for e in events], wants),
                within=120,
                deliveries=hooks.deliveries,
            )
            assert workers.crashed() == [], workers.tail()
        finally:
            workers.stop_all()
    letters = await scalar(fault_database_url, "SELECT count(*) FROM dead_letters")
    once = await scalar(
        fault_database_url,
        "SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL"
        " AND replay_count = 1 AND purged_at IS NULL",
    )
    record(
        "dead-letter replay under faults",
        EVENTS,
        f"{EVENTS} notify-review executions dead-lettered by a 410, then the receiver"
        f" recovered and `govflow dlq replay --all --rate {RATE}` ran ({len(replays.codes)}"
        f" runs, exit {replays.codes}) while 2 workers were SIGKILLed ({killed_at_work} with"
        f" entries in hand) and Redis restarted once",
        report,
        started,
    )
    assert report.ok, f"{report.summary()}\n{workers.tail()}\n{replays.output()}"
    assert replays.codes[-1] == 0, replays.output()
    assert "Traceback" not in replays.output(), replays.output()
    # Each letter replayed once, none dead-lettered anew by its replay.
    assert (letters, once) == (EVENTS, EVENTS)
    # Every webhook reached the receiver twice at least: the 410, then the replay's.
    assert all(len(bodies) >= 2 for bodies in hooks.deliveries().values())
    assert fault_redis.kills == 1
    assert killed_at_work, "neither kill found a worker at work: nothing was tested"
