"""Dead letters: list, show, replay (dry run, filters, rate, concurrency) and purge.

The end-to-end test dead-letters a real command half-way through its steps, replays it
twice at once, and checks that the remaining step runs once and the completed ones never
again; the others work on letters recorded as the workers record them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.cli.dlq import parse_rate
from govflow.db import dead_letters, executions
from govflow.db.dead_letters import DeadLetter, NewDeadLetter, Selection
from govflow.db.executions import NewExecution
from govflow.db.workflows import apply_workflow
from govflow.operations import dlq
from govflow.operations.dlq import EVERY, list_letters, purge, replay, replay_fields
from govflow.operations.lag import read_lag
from govflow.operations.replay_plan import plan
from govflow.producers.publish import Publisher
from govflow.runtime.worker import Worker
from govflow.schemas.codec import decode_event, decode_workflow, encode
from govflow.schemas.commands import RunWorkflow, execution_id
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.ops_helpers import govflow, govflow_env, wait_until

pytestmark = pytest.mark.anyio

THREE_STEPS = """\
name: review-and-notify
entity: policy
trigger: create
actions:
  - create_task: {{title: "Review {{data.title}}"}}
  - assign: {{assignee: risk-team}}
  - notify: {{webhook: "{url}", message: "{{data.title}} is under review"}}
"""
ONE_STEP = """\
name: new-evidence
entity: evidence
trigger: create
actions:
  - create_task: {title: "Check {data.title}"}
"""


class Hook:
    """A local webhook receiver that answers 200 and keeps each request's Idempotency-Key."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.keys.append(self.headers.get("Idempotency-Key", ""))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@pytest.fixture
def hook() -> Iterator[Hook]:
    receiver = Hook()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(timeout=10)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[None]:
    """The trigger matcher and action workers, in this process, until the block ends."""
    worker = Worker(settings, frozenset({"triggers", "actions"}))
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield
        finally:
            worker.stop()


async def scalar(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> Any:
    async with pool.connection() as conn:
        cur = await conn.execute(query.encode(), params)
        row = await cur.fetchone()
        return None if row is None else row[0]


async def record(pool: AsyncConnectionPool[Any], *letters: NewDeadLetter) -> list[int]:
    """Record dead letters as the workers do; return their ids in order."""
    async with pool.connection() as conn:
        await dead_letters.record(conn, letters)
        cur = await conn.execute("SELECT id FROM dead_letters ORDER BY id")
        return [row[0] for row in await cur.fetchall()][-len(letters) :]


def event_letter(keys: Keys, n: int, *, event_type: str = "evidence.created", **kw: Any) -> Any:
    event = new_event(event_type, f"E-{n}", data={"title": f"doc {n}"})
    return NewDeadLetter(
        stream=keys.events(),
        message_id=f"1-{n}",
        payload={"event": encode(event).decode()},
        error=kw.pop("error", "Postgres refused the event"),
        attempts=1,
        event_id=event.id,
        event_type=event.type,
        **kw,
    )


async def get(pool: AsyncConnectionPool[Any], dead_letter_id: int) -> DeadLetter:
    async with pool.connection() as conn:
        letter = await dead_letters.get(conn, dead_letter_id)
    assert letter is not None
    return letter


async def test_a_replayed_command_runs_its_remaining_step_once(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], prefix: str, hook: Hook
) -> None:
    keys = Keys(prefix)
    async with pool.connection() as conn:
        await apply_workflow(conn, decode_workflow(THREE_STEPS.format(url=hook.url)))
    event = new_event("policy.created", "POL-7", data={"title": "Access control"})
    exec_id = execution_id(event.tenant, event.id, "review-and-notify")

    # The webhook's host is not allowed: steps 1 and 2 commit, step 3 fails for good.
    async with running(make_settings(webhook_allowed_hosts="blocked.invalid")):
        await Publisher(redis, keys).publish(event)

        async def dead_lettered() -> list[DeadLetter]:
            async with pool.connection() as conn:
                return await dead_letters.list_open(conn)

        [letter] = await wait_until(dead_lettered, "the command to be dead-lettered")
    assert letter.stream == keys.commands()
    assert letter.execution_id == exec_id
    assert "GOVFLOW_WEBHOOK_ALLOWED_HOSTS" in letter.error
    commands_before = await redis.xlen(keys.commands())

    dry = await replay(redis, pool, keys, Selection(ids=(letter.id,)), actor="tester", dry_run=True)
    [p] = dry.plans
    assert (p.kind, p.event_id, p.matches) == ("command", event.id, ["review-and-notify v1"])
    [e] = p.executions
    assert (e.execution_id, e.status) == (exec_id, "dead_lettered")
    assert [(s.step, s.action) for s in e.skipped_steps] == [(1, "create_task"), (2, "assign")]
    assert [(s.step, s.action) for s in e.would_run] == [(3, "notify")]
    assert p.outcome == "would run 1 step in 1 execution"
    assert dry.replayed == []
    assert await redis.xlen(keys.commands()) == commands_before
    assert (await get(pool, letter.id)).replayed_at is None

    # Two operators replay it at the same moment: it goes back once.
    reports = []

    async def replay_once(actor: str) -> None:
        selection = Selection(ids=(letter.id,))
        reports.append(await replay(redis, pool, keys, selection, actor=actor, reason="fixed"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay_once, "alice")
        tg.start_soon(replay_once, "bob")
    [done] = [r for r in reports if r.replayed]
    [other] = [r for r in reports if not r.replayed]
    [skipped] = other.skipped
    assert skipped.id == letter.id
    assert skipped.why.startswith(("already replayed", "another replay"))
    assert await redis.xlen(keys.commands()) == commands_before + 1
    added: Any = await redis.xrange(keys.commands(), min=done.replayed[0].entry_id, count=1)
    fields = added[0][1]
    assert fields[b"attempt"] == b"1"
    assert fields[b"replay_of"] == str(letter.id).encode()
    assert fields[b"command"] == letter.payload["command"].encode()
    row = await get(pool, letter.id)
    assert (row.replayed_by, row.replay_reason, row.replay_count) == (done.actor, "fixed", 1)

    async def completed() -> bool:
        status = await scalar(
            pool, "SELECT status FROM workflow_executions WHERE id = %s::uuid", exec_id
        )
        return bool(status == "completed")

    async with running(make_settings()):
        await wait_until(completed, "the replay to complete")
        # A crash between XADD and COMMIT would add a second copy: it changes nothing.
        await redis.xadd(keys.commands(), replay_fields(row))

        async def drained() -> bool:
            report = await read_lag(redis, None, keys)
            actions = next(g for g in report.groups if g.group == "actions")
            return actions.lag == 0 and actions.pending == 0

        await wait_until(drained, "the second copy to be acknowledged")

    for table in ("tasks", "assignments", "notifications"):
        count = await scalar(
            pool, f"SELECT count(*) FROM {table} WHERE execution_id = %s::uuid", exec_id
        )
        assert count == 1, table
    assert hook.keys == [f"{exec_id}:3"]
    steps = await scalar(
        pool,
        "SELECT array_agg(attempts ORDER BY step) FROM execution_steps"
        " WHERE execution_id = %s::uuid",
        exec_id,
    )
    assert steps == [1, 1, 2]  # steps 1 and 2 never ran again
    assert await scalar(pool, "SELECT count(*) FROM dead_letters") == 1


async def test_two_replays_of_everything_share_the_letters(
    redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix)
    ids = await record(pool, *(event_letter(keys, n) for n in range(20)))
    reports = []

    async def replay_all(actor: str) -> None:
        reports.append(await replay(redis, pool, keys, Selection(), actor=actor))

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay_all, "terminal-1")
        tg.start_soon(replay_all, "terminal-2")

    first, second = ([r.id for r in report.replayed] for report in reports)
    assert not set(first) & set(second)
    assert sorted(first + second) == ids
    entries: Any = await redis.xrange(keys.events())
    assert sorted(int(fields[b"replay_of"]) for _, fields in entries) == ids
    again = await replay(redis, pool, keys, Selection(), actor="terminal-3")
    assert (again.replayed, again.skipped) == ([], [])
    assert await redis.xlen(keys.events()) == 20


async def test_filters_rate_and_purge(
    redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix)
    old, invalid, timeout, *rest = await record(
        pool,
        event_letter(keys, 1, event_type="policy.created", error="webhook timed out"),
        NewDeadLetter(
            stream=keys.events(),
            message_id="1-2",
            payload={"event": "{not json"},
            error="event is not valid JSON",
            attempts=1,
        ),
        event_letter(keys, 3, error="webhook timed out (ReadTimeout)"),
        event_letter(keys, 4),
        event_letter(keys, 5),
        event_letter(keys, 6),
    )
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE dead_letters SET created_at = %s WHERE id = %s",
            (datetime.now(UTC) - timedelta(hours=2), old),
        )

    def ids(report: Any) -> list[int]:
        return [r.id for r in report.replayed]

    dry = await replay(redis, pool, keys, Selection(reason="TIMED OUT"), actor="t", dry_run=True)
    assert [p.id for p in dry.plans] == [old, timeout]
    by_age = await replay(redis, pool, keys, Selection(older_than_s=3600), actor="t")
    assert ids(by_age) == [old]
    by_type = Selection(ids=(invalid, timeout, rest[0]), event_type="evidence.created")
    report = await replay(redis, pool, keys, by_type, actor="t")
    assert ids(report) == [timeout, rest[0]]
    assert [(s.id, s.why) for s in report.skipped] == [
        (invalid, "its event type is None, not evidence.created")
    ]
    reasons = await replay(redis, pool, keys, Selection(reason="%"), actor="t")
    assert ids(reasons) == []  # a % is a percent sign, not a wildcard
    assert await list_letters(pool, Selection(reason="%")) == []  # listing matches alike

    started = time.monotonic()
    rated = await replay(redis, pool, keys, Selection(ids=tuple(rest[1:])), actor="t", rate=5)
    assert ids(rated) == rest[1:]
    assert time.monotonic() - started >= 0.2  # one pause of 1/5 s between the two

    purged = await purge(pool, Selection(ids=(invalid, old, 999)), actor="carol")
    assert purged.purged == [invalid]
    assert [s.id for s in purged.skipped] == [old, 999]
    assert purged.skipped[0].why.startswith("already replayed at ")
    assert purged.skipped[0].why.endswith(" by t")
    assert purged.skipped[1].why == "no such dead letter"
    again = await replay(redis, pool, keys, Selection(ids=(invalid,)), actor="t")
    assert again.replayed == []
    assert again.skipped[0].why.startswith("purged at ")
    assert again.skipped[0].why.endswith(" by carol")
    assert (await purge(pool, Selection(), actor="carol")).purged == []


async def test_dry_run_of_events_says_what_would_run_now(
    pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix)
    async with pool.connection() as conn:
        await apply_workflow(conn, decode_workflow(ONE_STEP))
    fresh, done, invalid, unmatched = await record(
        pool,
        event_letter(keys, 1),
        event_letter(keys, 2),
        NewDeadLetter(
            stream=keys.events(), message_id="1-9", payload={}, error="no event", attempts=1
        ),
        event_letter(keys, 4, event_type="policy.deleted"),
    )
    # The event of the second letter has run its workflow since.
    letter = await get(pool, done)
    assert letter.event_id is not None
    done_exec = execution_id("default", letter.event_id, "new-evidence")
    async with pool.connection() as conn:
        await executions.insert_queued(
            conn,
            [
                NewExecution(
                    done_exec, "new-evidence", 1, letter.event_id, "evidence", "E-2", "default",
                    datetime.now(UTC),
                )
            ],
        )  # fmt: skip
        await executions.complete_steps(conn, [(done_exec, 1, "create_task")])
        await executions.finish(conn, [done_exec])
    letters = [await get(pool, i) for i in (fresh, done, invalid, unmatched)]

    plans = await plan(pool, keys, letters)

    assert [p.outcome for p in plans] == [
        "would run 1 step in 1 execution",
        "nothing would run",
        "entry has no `event` field: it would be dead-lettered again",
        "matches no enabled workflow now: acknowledged, nothing runs",
    ]
    [new] = plans[0].executions
    assert (new.status, new.note) == (None, "a new execution: every step runs")
    assert [(s.step, s.action) for s in new.would_run] == [(1, "create_task")]
    [old] = plans[1].executions
    assert (old.execution_id, old.status, old.would_run) == (done_exec, "completed", [])
    assert [s.step for s in old.skipped_steps] == [1]
    assert plans[0].matches == plans[1].matches == ["new-evidence v1"]
    assert plans[2].matches is None  # no event to match

    # The same event's commands: one for the completed execution, one for none at all.
    event = decode_event(letter.payload["event"])
    commands = [
        RunWorkflow(execution_id=i, workflow_name="new-evidence", workflow_version=1, event=event)
        for i in (done_exec, execution_id("default", "gone", "new-evidence"))
    ]
    command_letters = await record(
        pool,
        *(
            NewDeadLetter(
                stream=keys.commands(),
                message_id=f"2-{n}",
                payload={"command": encode(c).decode(), "attempt": "5", "replay_of": "1"},
                error="boom",
                attempts=5,
            )
            for n, c in enumerate(commands)
        ),
    )
    completed, gone = await plan(pool, keys, [await get(pool, i) for i in command_letters])
    assert (completed.kind, completed.matches) == ("command", ["new-evidence v1"])
    assert completed.outcome == "already completed: acknowledged, nothing runs"
    assert gone.outcome == "the execution does not exist: it would be dead-lettered again"
    assert replay_fields(await get(pool, command_letters[0])) == {
        "command": encode(commands[0]).decode(),
        "attempt": "1",
        "replay_of": str(command_letters[0]),
    }


def test_parse_rate() -> None:
    assert parse_rate("10/s") == 10
    assert parse_rate("2.5") == 2.5
    assert parse_rate("30/m") == 0.5
    for bad in ("0/s", "fast", "-1", "3/h"):
        with pytest.raises(Exception, match="--rate"):
            parse_rate(bad)


@pytest.mark.slow
@pytest.mark.timeout(300)  # five processes, three at once, on a busy machine
async def test_the_dlq_commands(
    redis_server_url: str, database_url: str, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix)
    env = govflow_env(redis_server_url, database_url, prefix)
    async with pool.connection() as conn:
        await apply_workflow(conn, decode_workflow(ONE_STEP))
    good, bad = await record(
        pool,
        event_letter(keys, 1),
        NewDeadLetter(
            stream=keys.events(),
            message_id="1-2",
            payload={"event": "{not json"},
            error="event is not valid JSON: truncated",
            attempts=1,
        ),
    )

    # The read-only commands at once: each process spends seconds importing.
    results: dict[str, Any] = {}

    async def run(name: str, *args: str) -> None:
        results[name] = await govflow(env, "dlq", *args)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "list", "list", "--json")
        tg.start_soon(run, "show", "show", str(bad))
        tg.start_soon(run, "dry", "replay", "--all", "--dry-run")
    for result in results.values():
        assert result.returncode == 0, result.stderr

    rows = json.loads(results["list"].stdout)
    assert [(r["id"], r["error"], r["replayed_at"]) for r in rows] == [
        (bad, "event is not valid JSON: truncated", None),
        (good, "Postgres refused the event", None),
    ]
    shown = results["show"].stdout.decode()
    assert "event is not valid JSON: truncated" in shown
    assert "event: {not json" in shown
    text = results["dry"].stdout.decode()
    assert f"dead letter {good} ({keys.events()}): event evidence.created" in text
    assert "now matches: new-evidence v1" in text
    assert "runs 1 create_task" in text
    assert "-> would run 1 step in 1 execution" in text
    assert f"dead letter {bad} " in text
    assert "it would be dead-lettered again" in text
    assert await redis_len(redis_server_url, keys.events()) == 0  # a dry run replays nothing

    replayed = await govflow(
        env, "dlq", "replay", str(good), "999", "--actor", "alice", "--reason", "fixed", "--json"
    )
    assert replayed.returncode == 1  # 999 does not exist; the other is replayed all the same
    assert replayed.stderr.decode().splitlines() == ["govflow: no dead letter with id 999"]
    report = json.loads(replayed.stdout)
    assert [r["id"] for r in report["replayed"]] == [good]
    assert report["skipped"] == [{"id": 999, "why": "no such dead letter"}]
    assert (report["actor"], report["reason"]) == ("alice", "fixed")
    letter = await get(pool, good)
    assert (letter.replayed_by, letter.replay_reason) == ("alice", "fixed")
    assert await redis_len(redis_server_url, keys.events()) == 1

    purged = await govflow(env, "dlq", "purge", "--all", "--actor", "bob", "--json")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {"actor": "bob", "purged": [bad], "skipped": []}
    assert (await get(pool, bad)).purged_by == "bob"


async def redis_len(url: str, key: str) -> int:
    client = Redis.from_url(url)
    try:
        return int(await client.xlen(key))
    finally:
        await client.aclose()


async def test_a_dry_run_says_when_it_describes_only_the_first_letters(
    redis: Redis, pool: AsyncConnectionPool[Any], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys(prefix)
    await record(pool, *(event_letter(keys, n) for n in range(3)))
    monkeypatch.setattr(dlq, "DRY_RUN_LIMIT", 2)
    report = await replay(redis, pool, keys, EVERY, actor="t", dry_run=True)
    assert (len(report.plans), report.more) == (2, True)
    monkeypatch.setattr(dlq, "DRY_RUN_LIMIT", 3)
    report = await replay(redis, pool, keys, EVERY, actor="t", dry_run=True)
    assert (len(report.plans), report.more) == (3, False)


async def test_a_replayed_command_redis_lost_is_put_back_by_the_reconciler(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], prefix: str, hook: Hook
) -> None:
    """Postgres is the record: the replay shows the execution queued, so when Redis loses
    the entry the replay added, the reconciler emits the command again."""
    keys = Keys(prefix)
    async with pool.connection() as conn:
        await apply_workflow(conn, decode_workflow(THREE_STEPS.format(url=hook.url)))
    event = new_event("policy.created", "POL-8", data={"title": "Access control"})
    exec_id = execution_id(event.tenant, event.id, "review-and-notify")
    async with running(make_settings(webhook_allowed_hosts="blocked.invalid")):
        await Publisher(redis, keys).publish(event)

        async def dead_lettered() -> list[DeadLetter]:
            async with pool.connection() as conn:
                return await dead_letters.list_open(conn)

        [letter] = await wait_until(dead_lettered, "the command to be dead-lettered")

    report = await replay(redis, pool, keys, Selection(ids=(letter.id,)), actor="tester")
    status = "SELECT status FROM workflow_executions WHERE id = %s::uuid"
    assert await scalar(pool, status, exec_id) == "queued"
    assert await redis.xdel(keys.commands(), report.replayed[0].entry_id) == 1  # Redis lost it

    async def completed() -> bool:
        return bool(await scalar(pool, status, exec_id) == "completed")

    async with running(make_settings(reconcile_after=1.0)):
        await wait_until(completed, "the reconciler to put the replayed command back")
    assert hook.keys == [f"{exec_id}:3"]
