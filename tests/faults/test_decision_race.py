"""A decision and an expiry racing for the same approval end in exactly one outcome.

README.md, "Workflows that wait for people". Every approval here needs both approvers
(``required: all``) within 3 s; each approver decides at a random instant around the due
time (through ``Decisions``; for some approvals bob runs ``govflow approvals approve``
or ``reject``), while the deadline service of two ``govflow run`` workers sweeps every
0.1 s.
Each approval must end in one outcome, given once (the record of updates in
``tests/faults/waits.py``); the decisions recorded must be exactly those accepted, all
made before the due time; an expired approval holds no rejection and too few approvals
to have counted; each execution runs the one branch of its outcome, and nothing twice.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db.decisions import RefusedError
from govflow.operations.decisions import Decisions
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from tests.faults.harness import (
    GOVFLOW,
    PREFIX,
    Producer,
    Workers,
    apply_workflows,
    expected_of,
    record,
    settle,
    wait_started,
)
from tests.faults.servers import RedisServer
from tests.faults.waits import outcome_problems, record_outcomes

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

EVENTS = 300
# Steps: 1 the approval, 2 the task once approved; branches 3 approved, 4 rejected, 5 expired.
RACE = """
name: race
entity: policy
trigger: create
actions:
  - create_approval:
      approvers: [alice, bob]
      required: all
      due_in: 3s
      wait: true
      on_approved: [{assign: {assignee: approved}}]
      on_rejected: [{assign: {assignee: rejected}}]
      on_expired: [{assign: {assignee: expired}}]
  - create_task: {title: "Publish {data.title}"}
"""
# Each decision lands this far from its approval's due time (seconds).
EARLIEST, LATEST = -1.0, 0.2
REJECT_EVERY = 5  # bob rejects every fifth approval
BY_CLI_EVERY = 50  # and decides every fiftieth through the command line
CLI_START_S = 1.0  # about how long ``govflow approvals`` takes to start, here


class Deciders:
    """Decide every approval as it appears, each approver at a random instant near its
    due time, through ``Decisions``; remember what each call was told."""

    def __init__(self, decisions: Decisions, database_url: str, env: dict[str, str]) -> None:
        self.decisions = decisions
        self.database_url = database_url
        self.env = env  # of a ``govflow`` command against the scenario's servers
        self.accepted: set[tuple[str, str, str]] = set()  # (approval, by, decision)
        self.refused: Counter[str] = Counter()  # why: expired, or decided already
        self.statuses: Counter[int] = Counter()  # of the refusals through Decisions
        self.by_cli = 0
        self.seen: set[str] = set()

    async def run(self, total: int) -> None:
        """Find new approvals until ``total`` were seen; decide each near its due time."""
        async with (
            await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn,
            anyio.create_task_group() as tg,
        ):
            while len(self.seen) < total:
                cur = await conn.execute(
                    "SELECT id::text, extract(epoch FROM due_at - clock_timestamp()),"
                    " entity_id FROM approvals"
                )
                for approval_id, due_in, entity_id in await cur.fetchall():
                    if approval_id in self.seen:
                        continue
                    self.seen.add(approval_id)
                    number = int(entity_id.rsplit("-", 1)[1])
                    reject = number % REJECT_EVERY == 0
                    for by, approve in (("alice", True), ("bob", not reject)):
                        delay = float(due_in) + random.uniform(EARLIEST, LATEST)
                        if by == "bob" and number % BY_CLI_EVERY == 0:
                            tg.start_soon(self.decide_by_cli, approval_id, approve,
                                          delay - CLI_START_S)  # fmt: skip
                        else:
                            tg.start_soon(self.decide, approval_id, by, approve, delay)
                await anyio.sleep(0.05)

    async def decide(self, approval_id: str, by: str, approve: bool, delay: float) -> None:
        await anyio.sleep(max(0.0, delay))
        try:
            await self.decisions.decide(approval_id, by=by, approve=approve)
        except RefusedError as refused:
            self.statuses[refused.status] += 1
            self.refused["expired" if "expired" in refused.reason else "decided"] += 1
        else:
            self.accepted.add((approval_id, by, "approve" if approve else "reject"))

    async def decide_by_cli(self, approval_id: str, approve: bool, delay: float) -> None:
        """bob decides with ``govflow approvals approve|reject``: exit 0, or 1 and why."""
        await anyio.sleep(max(0.0, delay))
        verb = "approve" if approve else "reject"
        done = await anyio.run_process(
            [str(GOVFLOW), "approvals", verb, approval_id, "--by", "bob"],
            env=self.env,
            check=False,
        )
        said = done.stderr.decode()
        self.by_cli += 1
        if done.returncode == 0:
            self.accepted.add((approval_id, "bob", verb))
        else:
            assert done.returncode == 1, said
            assert said.count("\n") == 1, said  # one line that says why
            self.refused["expired" if "expired" in said else "decided"] += 1


async def decision_problems(database_url: str, accepted: set[tuple[str, str, str]]) -> list[str]:
    """The decisions recorded against the outcomes, and against what the callers were told."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            'SELECT d.approval_id::text, d."by", d.decision, d.decided_at < a.due_at'
            " FROM approval_decisions d JOIN approvals a ON a.id = d.approval_id"
        )
        decisions = await cur.fetchall()
        cur = await conn.execute(
            "SELECT id::text, status, required, decided_at < due_at FROM approvals"
        )
        approvals = await cur.fetchall()
    problems = []
    recorded = {(a, by, what) for a, by, what, _ in decisions}
    if recorded != accepted:
        problems.append(
            f"decisions recorded but refused: {sorted(recorded - accepted)[:5]};"
            f" accepted but not recorded: {sorted(accepted - recorded)[:5]}"
        )
    problems += [
        f"{a}: {by} decided at or after the due time" for a, by, _, ok in decisions if not ok
    ]
    votes: dict[str, Counter[str]] = {a: Counter() for a, *_ in approvals}
    for approval_id, _, what, _ in decisions:
        votes[approval_id][what] += 1
    for approval_id, status, required, in_time in approvals:
        vote = votes[approval_id]
        agrees = {
            "approved": in_time and vote["approve"] >= required and not vote["reject"],
            "rejected": in_time and vote["reject"] == 1,
            "expired": not in_time and vote["approve"] < required and not vote["reject"],
        }.get(status, False)
        if not agrees:
            problems.append(f"{approval_id} is {status} with {dict(vote)} (in time: {in_time})")
    return problems


async def test_decisions_racing_the_expiry_end_each_approval_once(
    fault_redis: RedisServer, fault_database_url: str, logs: Path
) -> None:
    started = time.monotonic()
    db = fault_database_url
    await apply_workflows(db, [RACE])
    await record_outcomes(db)
    events = [
        new_event("policy.created", f"POL-race-{i}", data={"title": f"P{i}"}) for i in range(EVENTS)
    ]
    wants = {e.id: frozenset({"race"}) for e in events}
    workers = Workers(fault_redis.url, db, logs, log_level="info",
                      GOVFLOW_DEADLINE_INTERVAL="0.1")  # fmt: skip
    producer = Producer(fault_redis.url, Keys(PREFIX), chunk=20, pause=0.4)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(db, min_size=8, max_size=8, open=False)
    try:
        for slot in range(2):
            workers.start(slot)
        await wait_started(workers)
        async with pool, Redis.from_url(fault_redis.url) as redis:
            deciders = Deciders(Decisions(pool, redis, Keys(PREFIX)), db, workers.env)
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.run, events)
                tg.start_soon(deciders.run, EVENTS)
        report = await settle(fault_redis.url, db, expected_of(producer.accepted, wants), within=90)
        assert workers.crashed() == [], workers.tail()
    finally:
        workers.stop_all()
    outcomes = await outcome_problems(db)
    decided = await decision_problems(db, deciders.accepted)
    ended = await _outcomes(db)
    faults = (
        f"{2 * EVENTS} decisions ({deciders.by_cli} by `govflow approvals`, the rest through"
        f" Decisions) at random instants from {EARLIEST:+g} to {LATEST:+g} s of each due time,"
        f" against 2 workers expiring every 0.1 s:"
        f" {', '.join(f'{n} {s}' for s, n in sorted(ended.items()))}; refused"
        f" {deciders.refused['expired']} as expired, {deciders.refused['decided']} as decided"
    )
    record("decision versus expiry", EVENTS, faults, report, started)
    assert report.ok, f"{report.summary()}\n{workers.tail()}"
    assert outcomes == [], outcomes[:20]
    assert decided == [], decided[:20]
    # Both sides won some races: otherwise nothing raced.
    assert ended["expired"], ended
    assert ended["approved"] + ended["rejected"], ended
    assert deciders.refused["expired"], deciders.refused
    assert set(deciders.statuses) == {409}, deciders.statuses
    assert deciders.by_cli == EVENTS // BY_CLI_EVERY


async def _outcomes(database_url: str) -> Counter[str]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT status, count(*) FROM approvals GROUP BY status")
        return Counter({status: int(n) for status, n in await cur.fetchall()})
