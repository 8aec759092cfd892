"""The moving parts of a fault scenario: workflows, events, worker processes, a producer.

A scenario publishes ``EVENTS`` events while ``govflow run`` processes work on them, injects
its faults, then waits until the invariant checker is satisfied (or its deadline passes)
and records one row of the reliability table (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg
from psycopg import AsyncConnection
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from govflow.db.workflows import apply_workflow
from govflow.producers.publish import Publisher, PublishRetry
from govflow.runtime.worker import Worker
from govflow.schemas.codec import decode_workflow
from govflow.schemas.errors import PublishError
from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import GROUP_OF, Keys
from govflow.schemas.settings import Settings
from tests.faults.invariants import Expected, Report, check
from tests.pipeline_helpers import running_worker, terminate

# Events per scenario: "a few thousand" in the issue, kept modest for a shared 2-core box.
EVENTS = 1500
CLAIM_IDLE = 2.0
GOVFLOW = Path(sys.executable).parent / "govflow"
PREFIX = "govflow"

# Three workflows: one for every new policy, one more for the risky ones, one for
# evidence. Assessments match none: their events must run nothing at all.
WORKFLOWS = (
    """
name: review
entity: policy
trigger: create
actions:
  - create_approval: {approvers: [compliance-officer], due_in_days: 5}
  - create_task: {title: "Review {data.title}", assignee: "{data.owner}"}
  - assign: {assignee: risk-team}
""",
    """
name: high-risk
entity: policy
trigger: create
when: [{field: risk, in: [high, critical]}]
actions:
  - create_task: {title: "Assess {data.title}"}
  - assign: {assignee: ciso}
""",
    """
name: evidence-check
entity: evidence
trigger: create
actions:
  - create_task: {title: "Check {data.title}"}
""",
)
RISKS = ("low", "medium", "high", "critical")


def make_events(n: int, tag: str) -> tuple[list[Event], dict[str, frozenset[str]]]:
    """``n`` events of three kinds, and the workflows each must run (the test's own oracle)."""
    events: list[Event] = []
    wants: dict[str, frozenset[str]] = {}
    for i in range(n):
        kind = i % 10
        if kind < 7:
            risk = RISKS[i % 4]
            event = new_event(
                "policy.created",
                f"POL-{tag}-{i}",
                data={"title": f"Policy {i}", "owner": f"user-{i % 7}", "risk": risk},
            )
            names = {"review"} | ({"high-risk"} if risk in ("high", "critical") else set())
        elif kind < 9:
            event = new_event("evidence.created", f"EV-{tag}-{i}", data={"title": f"Doc {i}"})
            names = {"evidence-check"}
        else:
            event = new_event("assessment.created", f"AS-{tag}-{i}", data={"title": f"A {i}"})
            names = set()
        events.append(event)
        wants[event.id] = frozenset(names)
    return events, wants


async def apply_workflows(database_url: str, texts: Sequence[str] = WORKFLOWS) -> None:
    """Store the scenario's workflow definitions."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for text in texts:
            await apply_workflow(conn, decode_workflow(text, "scenario"))


class Workers:
    """``govflow run`` processes, started, killed and stopped the way an operator would."""

    def __init__(
        self,
        redis_url: str,
        database_url: str,
        logs: Path,
        *,
        roles: str = "triggers,actions",
        concurrency: int = 2,
        log_level: str = "warning",
        **env: str,
    ) -> None:
        self.logs = logs
        self.args = [
            str(GOVFLOW), "--log-level", log_level, "run", "--role", roles,
            "--concurrency", str(concurrency),
        ]  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
        self.env.update(
            {
                "GOVFLOW_REDIS_URL": redis_url,
                "GOVFLOW_DATABASE_URL": database_url,
                "GOVFLOW_PREFIX": PREFIX,
                "GOVFLOW_CLAIM_IDLE": str(CLAIM_IDLE),
                "GOVFLOW_BACKOFF_BASE": "0.05",
                "GOVFLOW_SHUTDOWN_GRACE": "20",
                "GOVFLOW_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",  # the receivers listen on loopback
                **env,  # a scenario's own settings win
            }
        )
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.log_of: dict[int, Path] = {}
        self.started = 0
        self.killed = 0
        self.exit_codes: list[int] = []

    def start(self, slot: int) -> subprocess.Popen[bytes]:
        """Start the worker of ``slot`` (its log: ``worker-<slot>-<n>.log``)."""
        self.started += 1
        log = self.logs / f"worker-{slot}-{self.started}.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        self.procs[slot] = proc
        self.log_of[slot] = log
        return proc

    def kill(self, slot: int) -> None:
        """SIGKILL the worker of ``slot``: no cleanup of any kind."""
        proc = self.procs.pop(slot)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            self.killed += 1
        proc.wait(10)

    def terminate(self, *slots: int, within: float = 40.0) -> list[int]:
        """SIGTERM the workers of ``slots`` at once; return their exit statuses."""
        procs = [self.procs.pop(slot) for slot in slots]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(within) for proc in procs]
        self.exit_codes += codes
        return codes

    def alive(self) -> list[int]:
        """The slots whose process is running."""
        return [slot for slot, proc in self.procs.items() if proc.poll() is None]

    def ready(self) -> list[int]:
        """The running slots whose worker said ``worker.started`` (needs log level info)."""
        return [
            slot for slot in self.alive() if b'"worker.started"' in self.log_of[slot].read_bytes()
        ]

    def crashed(self) -> list[str]:
        """The logs of processes that exited by themselves (none should)."""
        return [
            f"slot {slot} exited {proc.returncode}"
            for slot, proc in self.procs.items()
            if proc.poll() is not None
        ]

    def stop_all(self) -> None:
        """SIGTERM every worker, then SIGKILL any that does not go (used on the way out)."""
        for slot in list(self.procs):
            terminate(self.procs.pop(slot))

    def tail(self, lines: int = 30) -> str:
        """The last lines of every worker log, for a failure message.

        The logs of workers that exited by themselves come last, so the cut keeps them.
        """
        exited = {self.log_of[slot] for slot, proc in self.procs.items() if proc.poll() is not None}
        out = []
        for log in sorted(self.logs.glob("worker-*.log"), key=lambda p: (p in exited, p.name)):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)[-8000:]


async def wait_started(workers: Workers, within: float = 90.0) -> None:
    """Wait until every running worker says ``worker.started`` (needs log level info).

    Starting a process takes seconds on a busy machine; a signal sent before its handler
    is installed kills it the default way, which is not what a scenario means to test.
    """
    deadline = time.monotonic() + within
    while True:
        waiting = [
            slot
            for slot in workers.procs
            if b'"worker.started"' not in workers.log_of[slot].read_bytes()
        ]
        if not waiting:
            return
        assert workers.crashed() == [], workers.tail()
        if time.monotonic() > deadline:
            raise AssertionError(f"workers {waiting} did not start\n{workers.tail()}")
        await anyio.sleep(0.1)


async def some_ready(workers: Workers, within: float = 90.0) -> list[int]:
    """Wait until at least one worker is started; return the started ones."""
    deadline = time.monotonic() + within
    while not (ready := workers.ready()):
        assert time.monotonic() < deadline, f"no worker started\n{workers.tail()}"
        await anyio.sleep(0.05)
    return ready


async def holders(
    redis_url: str, pids: Collection[int], within: float, keys: Keys | None = None
) -> list[int]:
    """Wait until some of the worker processes ``pids`` hold entries (delivered, not
    acknowledged); return those that do, or none once ``within`` seconds passed."""
    redis = Redis.from_url(redis_url, socket_timeout=5)
    keys = keys or Keys(PREFIX)
    places = [
        (keys.stream(role, p), group)
        for p in keys.all_partitions()
        for role, group in GROUP_OF.items()
    ]
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            holding: set[int] = set()
            for stream, group in places:
                try:
                    summary = await redis.xpending(stream, group)
                except redis_errors.ResponseError:
                    continue  # no group yet
                for consumer in summary["consumers"]:
                    name = consumer["name"].decode()
                    if int(consumer["pending"]):
                        holding.update(pid for pid in pids if f"-{pid}-" in name)
            if holding:
                return sorted(holding)
            await anyio.sleep(0.01)
        return []
    finally:
        await redis.aclose()


class Producer:
    """Publish events over a stretch of time through one long-lived ``Publisher``.

    The publisher retries a lost connection by itself; when an outage outlasts its
    retries it raises ``PublishError`` and, like any application would, the producer
    tries the same events again a moment later. Only events whose publish returned are
    counted as accepted.
    """

    def __init__(self, redis_url: str, keys: Keys, *, chunk: int = 25, pause: float = 0.1) -> None:
        self.redis_url = redis_url
        self.keys = keys
        self.chunk = chunk
        self.pause = pause
        self.accepted: list[str] = []
        self.publish_errors = 0

    async def run(self, events: Sequence[Event]) -> None:
        """Publish every event, a chunk at a time."""
        retry = PublishRetry(attempts=6, initial_delay=0.1, max_delay=1.0)
        async with Publisher.from_url(self.redis_url, self.keys, retry=retry) as publisher:
            for start in range(0, len(events), self.chunk):
                batch = events[start : start + self.chunk]
                while True:
                    try:
                        self.accepted += await publisher.publish_many(batch)
                        break
                    except PublishError:
                        self.publish_errors += 1
                        await anyio.sleep(0.5)
                await anyio.sleep(self.pause)


async def kill_one(
    redis_url: str,
    workers: Workers,
    *,
    within: float = 5.0,
    keys: Keys | None = None,
    before_kill: Callable[[int], Awaitable[object]] | None = None,
) -> bool:
    """SIGKILL a started worker and start it again; return whether it held entries.

    The victim is one of the workers that hold entries, picked at random, as soon as one
    does; after ``within`` seconds with none, any started worker. (Waiting on a victim
    picked beforehand missed the work whenever that one held no partition's lease.)
    ``before_kill`` is called with its pid first when it holds some."""
    slot_of = {workers.procs[slot].pid: slot for slot in await some_ready(workers)}
    busy = await holders(redis_url, slot_of, within, keys)
    pid = random.choice(busy or list(slot_of))
    if busy and before_kill is not None:
        await before_kill(pid)
    workers.kill(slot_of[pid])
    workers.start(slot_of[pid])
    return bool(busy)


async def kill_at_work(
    redis_url: str,
    workers: Workers,
    producer: Producer,
    events: Sequence[Event],
    kills: int,
    *,
    keys: Keys | None = None,
    before_kill: Callable[[int], Awaitable[object]] | None = None,
) -> int:
    """Publish ``events`` while SIGKILLing workers (``kill_one``) ``kills`` times, at
    random instants; return how many kills caught a worker with entries in hand. The
    kills stop early once every event is in and a victim held nothing."""
    in_work = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer.run, events)
        for _ in range(kills):
            busy = await kill_one(redis_url, workers, keys=keys, before_kill=before_kill)
            in_work += busy
            if not busy and len(producer.accepted) == len(events):
                break  # the events are all in, and worked through
            await anyio.sleep(jitter(0.1, 0.6))
    return in_work


async def run_check(
    redis_url: str,
    database_url: str,
    expected: Expected,
    deliveries: Callable[[], Mapping[str, Sequence[bytes]]] | None = None,
    keys: Keys | None = None,
) -> Report:
    """One pass of the invariant checker with fresh connections (one partition by default)."""
    redis = Redis.from_url(redis_url, socket_timeout=10)
    try:
        async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
            return await check(
                redis, conn, keys or Keys(PREFIX), expected, deliveries() if deliveries else None
            )
    finally:
        await redis.aclose()


async def settle(
    redis_url: str,
    database_url: str,
    expected: Expected | Callable[[], Awaitable[Expected]],
    *,
    within: float,
    deliveries: Callable[[], Mapping[str, Sequence[bytes]]] | None = None,
    keys: Keys | None = None,
) -> Report:
    """Check until every invariant holds, or ``within`` seconds pass; return the last report.

    ``expected`` may be read afresh for each check, when what is expected grows while the
    work goes on (chained events).
    """
    deadline = time.monotonic() + within
    while True:
        try:
            now = expected if isinstance(expected, Expected) else await expected()
            report = await run_check(redis_url, database_url, now, deliveries, keys)
        except (OSError, psycopg.OperationalError) as e:  # a server still coming back
            report = Report(problems=[f"checker could not read: {e}"])
        if report.ok or time.monotonic() > deadline:
            return report
        await anyio.sleep(1.0)


@asynccontextmanager
async def in_process_worker(
    redis_url: str, database_url: str, **settings: Any
) -> AsyncIterator[Worker]:
    """A ``Worker`` of both groups in this event loop; stopped gracefully on the way out."""
    configured = msgspec.convert(
        {
            "redis_url": redis_url,
            "database_url": database_url,
            "prefix": PREFIX,
            "claim_idle": CLAIM_IDLE,
            "backoff_base": 0.05,
            **settings,
        },
        Settings,
    )
    async with running_worker(configured, concurrency=1) as worker:
        yield worker


async def scalar(database_url: str, query: str) -> Any:
    """The first column of the first row ``query`` returns (None when no row)."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(query.encode())
        row = await cur.fetchone()
        return row[0] if row else None


async def wait_until(what: str, done: Callable[[], Awaitable[bool]], within: float = 60.0) -> None:
    """Poll ``done`` until it says yes; fail saying ``what`` was waited for after ``within`` s."""
    deadline = time.monotonic() + within
    while not await done():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await anyio.sleep(0.2)


class Row(msgspec.Struct, kw_only=True):
    """One line of the reliability table."""

    scenario: str
    events: int
    faults: str
    lost: int
    duplicated: int
    redelivered: int
    seconds: float


def record(scenario: str, events: int, faults: str, report: Report, started: float) -> Row:
    """Print the scenario's row, and append it to ``TEST_FAULTS_REPORT`` when that is set."""
    row = Row(
        scenario=scenario,
        events=events,
        faults=faults,
        lost=report.lost,
        duplicated=report.duplicated,
        redelivered=report.redelivered,
        seconds=round(time.monotonic() - started, 1),
    )
    print(f"\n{scenario}: {msgspec.json.encode(row).decode()}")
    if path := os.environ.get("TEST_FAULTS_REPORT"):
        with open(path, "ab") as f:
            f.write(msgspec.json.encode(row) + b"\n")
    return row


def jitter(low: float, high: float) -> float:
    """A random pause between ``low`` and ``high`` seconds: faults at random instants."""
    return random.uniform(low, high)


def expected_of(
    accepted: Sequence[str], wants: dict[str, frozenset[str]], **extra: Any
) -> Expected:
    """What the checker expects from the events whose publish returned."""
    return Expected(workflows={event_id: wants[event_id] for event_id in accepted}, **extra)
