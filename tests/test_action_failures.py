"""What an action's failure means: an attempt counted, never a server "unavailable".

A plug-in's ``OSError`` (its SMTP server refusing a connection), a statement timeout in
its own SQL and a step that runs past its time limit each fail that attempt and end
dead-lettered after ``GOVFLOW_MAX_ATTEMPTS``; ``RetryLater`` schedules the retry when the
action asks, within the backoff cap. The actions are a test plug-in, installed as a bare
``dist-info`` directory on ``sys.path`` (what ``importlib.metadata`` reads).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from govflow.consumers.loop import GroupConsumer
from govflow.consumers.outcomes import Outcome, RetryPolicy
from govflow.consumers.streams import Entry, Streams
from govflow.core.unavailable import is_unavailable
from govflow.plugins.registry import ENTRY_POINT_GROUP, registry
from govflow.schemas.commands import execution_id
from govflow.schemas.errors import ActionFailedError, UnavailableError
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys, Role
from govflow.schemas.settings import Settings
from tests.pipeline_helpers import (
    add_entry,
    apply,
    fetch,
    publish,
    retry_due,
    running_worker,
    wait_for,
    wait_settled,
)

pytestmark = pytest.mark.anyio

PLUGIN = """\
from __future__ import annotations

import anyio
import msgspec

from govflow.plugins import RetryLater, StepContext, action


class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    seconds: float = 0.0


@action("smtp_refused", io=True)
async def smtp_refused(ctx: StepContext, p: Params) -> None:
    raise ConnectionRefusedError(111, "Connection refused (smtp.example.org:25)")


@action("slow_query")
async def slow_query(ctx: StepContext, p: Params) -> None:
    await ctx.conn.execute("SET LOCAL statement_timeout = '50ms'")
    await ctx.conn.execute("SELECT pg_sleep(5)")


@action("hang", io=True)
async def hang(ctx: StepContext, p: Params) -> None:
    await anyio.sleep(3600)


@action("later", io=True)
async def later(ctx: StepContext, p: Params) -> None:
    raise RetryLater(p.seconds)
"""
ACTIONS = ("smtp_refused", "slow_query", "hang", "later")


@pytest.fixture
def test_actions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test plug-in's actions, installed for this test only."""
    info = tmp_path / "gf_failing_actions-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gf-failing-actions\nVersion: 0.1\n"
    )
    points = "\n".join(f"{name} = gf_failing_actions:{name}" for name in ACTIONS)
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{points}\n")
    (tmp_path / "gf_failing_actions.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gf_failing_actions", raising=False)
    registry.cache_clear()
    yield
    registry.cache_clear()


def workflow(name: str, step: str) -> str:
    return f"""
name: {name}
entity: policy
trigger: create
when: [{{field: case, equals: {name}}}]
actions:
  - create_task: {{title: "Review {{data.title}}"}}
  - {step}
"""


async def run_to_the_end(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool[Any], name: str, step: str
) -> tuple[str, int, str]:
    """Run one event through ``step``; the execution's status, attempts and last error."""
    await apply(pool, workflow(name, step))
    event = new_event("policy.created", f"POL-{name}", data={"title": name, "case": name})
    async with running_worker(settings):
        await publish(redis, settings.keys(), [event])
        await wait_settled(pool, 1, status="dead_lettered", within=30)
    (row,) = await fetch(
        pool,
        "SELECT status, attempts, last_error FROM workflow_executions WHERE id = %s",
        execution_id(event.tenant, event.id, name),
    )
    return row[0], row[1], row[2]


# The classifier ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (redis_errors.ConnectionError("refused"), True),
        (redis_errors.BusyLoadingError("loading"), True),
        (redis_errors.ClusterDownError("down"), True),
        (redis_errors.AuthenticationError("wrong password"), False),
        (psycopg.OperationalError("connection failed"), True),  # no SQLSTATE: no connection
        (psycopg.errors.ConnectionFailure("08006"), True),
        (psycopg.errors.AdminShutdown("57P01"), True),
        (psycopg.errors.CannotConnectNow("57P03"), True),
        (psycopg.errors.TooManyConnections("53300"), True),
        (psycopg.errors.QueryCanceled("statement timeout"), False),
        (psycopg.errors.DiskFull("53100"), False),
        (psycopg.errors.UniqueViolation("23505"), False),
        (PoolTimeout("no connection in 30 s"), True),
        (UnavailableError("publish failed"), True),
        (OSError("socket below a client"), True),
        (ActionFailedError("Connection refused (smtp.example.org:25)"), False),
        (ValueError("a bug"), False),
    ],
)
def test_one_classifier_says_what_is_an_outage(error: Exception, unavailable: bool) -> None:
    assert is_unavailable(error) is unavailable


# Action failures count attempts ----------------------------------------------------------


@pytest.mark.slow
async def test_a_plugin_raising_oserror_is_dead_lettered_after_its_attempts(
    test_actions: None, make_settings: Callable[..., Settings], redis: Redis,
    pool: AsyncConnectionPool[Any],
) -> None:  # fmt: skip
    settings = make_settings(max_attempts=3)
    status, attempts, error = await run_to_the_end(
        settings, redis, pool, "smtp", "smtp_refused: {}"
    )
    assert (status, attempts) == ("dead_lettered", 3)
    assert "Connection refused (smtp.example.org:25)" in error
    assert "attempt 3 of 3" in error
    # The step before it happened once, and no other.
    assert await fetch(
        pool, "SELECT step, status, attempts FROM execution_steps ORDER BY step"
    ) == [
        (1, "completed", 1),
        (2, "failed", 3),
    ]
    assert await fetch(pool, "SELECT count(*) FROM tasks") == [(1,)]


@pytest.mark.slow
async def test_a_statement_timeout_in_an_action_is_dead_lettered_after_its_attempts(
    test_actions: None, make_settings: Callable[..., Settings], redis: Redis,
    pool: AsyncConnectionPool[Any],
) -> None:  # fmt: skip
    settings = make_settings(max_attempts=3)
    status, attempts, error = await run_to_the_end(
        settings, redis, pool, "timeout", "slow_query: {}"
    )
    assert (status, attempts) == ("dead_lettered", 3)
    assert "statement timeout" in error


@pytest.mark.slow
async def test_a_step_past_its_time_limit_fails_that_attempt(
    test_actions: None, make_settings: Callable[..., Settings], redis: Redis,
    pool: AsyncConnectionPool[Any],
) -> None:  # fmt: skip
    # The definition's own limit wins over GOVFLOW_STEP_TIMEOUT.
    settings = make_settings(max_attempts=2, step_timeout=3600)
    status, attempts, error = await run_to_the_end(
        settings, redis, pool, "hung", "hang: {timeout: 200ms}"
    )
    assert (status, attempts) == ("dead_lettered", 2)
    assert "step 2 (hang) took longer than 0.2 s" in error


@pytest.mark.slow
async def test_an_action_asks_for_its_own_delay_within_the_cap(
    test_actions: None, make_settings: Callable[..., Settings], redis: Redis,
    pool: AsyncConnectionPool[Any],
) -> None:  # fmt: skip
    settings = make_settings(backoff_max=120)
    keys = settings.keys()
    await apply(pool, workflow("later", "later: {seconds: 86400}"))
    event = new_event("policy.created", "POL-later", data={"title": "x", "case": "later"})
    before = time.time()
    async with running_worker(settings):
        await publish(redis, keys, [event])
        scheduled = await wait_for(
            lambda: retry_due(redis, keys),
            lambda found: len(found) == 1,
            within=20,
            what="the retry scheduled",
        )
    (due,) = scheduled
    # Asked for a day; the cap is two minutes (the default backoff would be milliseconds).
    assert before + 120 <= due <= time.time() + 120
    (row,) = await fetch(pool, "SELECT status, last_error FROM workflow_executions")
    assert row == ("retrying", "retry requested in 86400 s")


# A batch held for an outage: for a while, not for good -----------------------------------


class Unavailable:
    """A handler whose server never comes back."""

    role: Role = "commands"

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, batch: Sequence[Entry]) -> list[Outcome]:
        self.calls += 1
        raise UnavailableError("Postgres is away")


async def test_a_batch_held_past_the_cap_counts_an_attempt(
    redis: Redis, pool: AsyncConnectionPool[Any], prefix: str
) -> None:
    keys = Keys(prefix)
    streams = Streams(redis)
    handler = Unavailable()
    consumer = GroupConsumer(
        streams=streams, pool=pool, keys=keys, partition=0, handler=handler, consumer="c1",
        policy=RetryPolicy(max_attempts=5, backoff_base=60), batch_size=10,
        claim_idle_s=30, hold_max_s=0.5,
    )  # fmt: skip
    await streams.ensure_group(consumer.stream, consumer.group)
    await add_entry(redis, consumer.stream, {b"command": b"{}"})
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run)
        retried = await wait_for(
            lambda: redis.zcard(keys.retry()),
            lambda n: n == 1,
            within=20,
            what="the held entry scheduled for a retry",
        )
        consumer.stop()
    assert retried == 1
    assert handler.calls > 1  # held and tried again first, then given up on
    assert await redis.xpending(consumer.stream, consumer.group) == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }  # fmt: skip


# A batch Postgres refuses part of ------------------------------------------------------


@pytest.mark.slow
async def test_an_execution_postgres_refuses_fails_alone_and_the_batch_completes(
    make_settings: Callable[..., Settings], redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    # Database steps only: the batch is written whole in the transaction that locked it,
    # and one refused row undoes it all; then each execution is written alone.
    settings = make_settings(max_attempts=1)
    await apply(pool, workflow("split", "assign: {assignee: risk-team}"))
    async with pool.connection() as conn:
        await conn.execute(
            "ALTER TABLE tasks ADD CONSTRAINT no_poison CHECK (title <> 'Review poison')"
        )
    titles = ["first", "poison", "last"]
    events = [
        new_event("policy.created", f"POL-{t}", data={"title": t, "case": "split"}) for t in titles
    ]
    await publish(redis, settings.keys(), events)
    # The three commands are all on the stream before an actions consumer reads: one batch.
    async with running_worker(settings, roles=frozenset({"triggers"}), concurrency=1):
        await wait_for(
            lambda: redis.xlen(settings.keys().commands()),
            lambda n: n == len(events),
            within=30,
            what="the three commands emitted",
        )
    with structlog.testing.capture_logs() as logs, anyio.fail_after(60):
        async with running_worker(settings, roles=frozenset({"actions"}), concurrency=1):
            await wait_for(
                lambda: fetch(
                    pool, "SELECT count(*) FROM workflow_executions WHERE finished_at IS NOT NULL"
                ),
                lambda rows: rows == [(3,)],
                within=30,
                what="the three executions finished",
            )
    rows = await fetch(
        pool,
        "SELECT entity_id, status, attempts, last_error FROM workflow_executions ORDER BY entity_id",
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("POL-first", "completed", 1),
        ("POL-last", "completed", 1),
        ("POL-poison", "dead_lettered", 1),
    ]
    assert "no_poison" in rows[2][3]
    # Refused within its batch of three: split once, and only there.
    assert [e["size"] for e in logs if e["event"] == "batch.split"] == [3]
    # The others' steps and rows were written once, the refused one's not at all.
    assert await fetch(pool, "SELECT count(*) FROM execution_steps") == [(4,)]
    assert await fetch(pool, "SELECT entity_id FROM tasks ORDER BY entity_id") == [
        ("POL-first",),
        ("POL-last",),
    ]
