"""Shared steps of the pipeline tests: apply a workflow, publish, run a worker, wait, check.

Everything here talks to the real servers of the test session; nothing is mocked. Waits
poll a condition against a deadline and fail with what they last saw.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import anyio
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db.workflows import apply_workflow
from govflow.producers.publish import Publisher
from govflow.runtime.worker import Worker
from govflow.schemas.codec import decode_workflow
from govflow.schemas.events import Event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings

T = TypeVar("T")

# The table each built-in action writes its effect to, one row per (execution_id, step).
EFFECT_TABLE = {
    "create_approval": "approvals",
    "create_task": "tasks",
    "assign": "assignments",
    "notify": "notifications",
    "change_status": "status_changes",
}
PIPELINE_ROLES = frozenset({"triggers", "actions"})
# The console script installed next to this interpreter: what an operator runs.
GOVFLOW = Path(sys.executable).parent / "govflow"


async def apply(pool: AsyncConnectionPool[Any], text: str) -> int:
    """Validate and store a workflow definition (YAML); return its version."""
    async with pool.connection() as conn:
        version, _ = await apply_workflow(conn, decode_workflow(text, "test"))
    return version


async def publish(redis: Redis, keys: Keys, events: Iterable[Event], chunk: int = 500) -> None:
    """Publish events through the library, in pipelined chunks."""
    publisher = Publisher(redis, keys)
    batch = list(events)
    for start in range(0, len(batch), chunk):
        await publisher.publish_many(batch[start : start + chunk])


async def wait_for(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    within: float,
    what: str,
    every: float = 0.1,
) -> T:
    """Call ``probe`` until ``done(value)``; fail after ``within`` seconds, showing the value."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last: {value!r}")
        await anyio.sleep(every)


async def fetch(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one query; return its rows."""
    async with pool.connection() as conn:
        cur = await conn.execute(query.encode(), params)
        rows: list[tuple[Any, ...]] = await cur.fetchall()
        return rows


async def scalar(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> Any:
    """Run one query; return the first column of its first row."""
    rows = await fetch(pool, query, *params)
    return rows[0][0]


async def statuses(pool: AsyncConnectionPool[Any]) -> dict[str, int]:
    """How many executions are in each status."""
    rows = await fetch(pool, "SELECT status, count(*) FROM workflow_executions GROUP BY status")
    return {status: int(n) for status, n in rows}


async def wait_settled(
    pool: AsyncConnectionPool[Any], expected: int, *, within: float, status: str = "completed"
) -> dict[str, int]:
    """Wait until exactly ``expected`` executions exist and all have ``status``."""
    return await wait_for(
        lambda: statuses(pool),
        lambda s: s == {status: expected} if expected else not s,
        within=within,
        what=f"{expected} executions {status}",
    )


async def effect_problems(pool: AsyncConnectionPool[Any]) -> list[str]:
    """Compare each execution's steps with the effect rows written; describe every mismatch.

    For every completed step of every execution there must be exactly one row, keyed by
    (execution_id, step), in the table of its action, and none anywhere else. The unique
    keys forbid two rows for one step; what this catches is a missing row, a row for a
    step that did not complete, or a row in the wrong table.
    """
    rows = await fetch(
        pool,
        "SELECT e.id::text, e.status, w.definition -> 'actions'"
        " FROM workflow_executions e JOIN workflows w"
        " ON w.name = e.workflow_name AND w.version = e.workflow_version",
    )
    steps = {
        (exec_id, step): action
        for exec_id, step, action in await fetch(
            pool,
            "SELECT execution_id::text, step, action FROM execution_steps"
            " WHERE status = 'completed'",
        )
    }
    expected: set[tuple[str, str, int]] = set()
    problems: list[str] = []
    for exec_id, status, actions in rows:
        for step, action in enumerate(actions, start=1):
            (name,) = action.keys()
            if status == "completed" and (exec_id, step) not in steps:
                problems.append(f"{exec_id} step {step} ({name}) is not completed")
            if (exec_id, step) in steps:
                expected.add((EFFECT_TABLE[name], exec_id, step))
    found: set[tuple[str, str, int]] = set()
    for table in sorted(set(EFFECT_TABLE.values())):
        table_rows = await fetch(pool, f"SELECT execution_id::text, step FROM {table}")
        found |= {(table, exec_id, step) for exec_id, step in table_rows}
        if len(table_rows) != len({(e, s) for e, s in table_rows}):
            problems.append(f"{table} holds two rows for one step")
    problems += [f"missing effect {t} {e} step {s}" for t, e, s in sorted(expected - found)]
    problems += [f"unexpected effect {t} {e} step {s}" for t, e, s in sorted(found - expected)]
    return problems


async def effect_counts(pool: AsyncConnectionPool[Any]) -> dict[str, int]:
    """Rows in each effect table."""
    return {
        table: int(await scalar(pool, f"SELECT count(*) FROM {table}"))
        for table in sorted(set(EFFECT_TABLE.values()))
    }


async def stream_state(redis: Redis, keys: Keys) -> dict[str, int]:
    """What is left in flight: pending entries per group, scheduled retries, dead letters."""
    state: dict[str, int] = {}
    for stream, group in ((keys.events(), "triggers"), (keys.commands(), "actions")):
        try:
            summary = await redis.xpending(stream, group)
        except Exception:  # no stream or no group yet: nothing pending
            state[f"{group}_pending"] = 0
        else:
            state[f"{group}_pending"] = int(summary["pending"])
    state["retry_scheduled"] = int(await redis.zcard(keys.retry()))
    state["dead_stream"] = int(await redis.xlen(keys.dead()))
    return state


async def add_entry(redis: Redis, stream: str, fields: dict[bytes, bytes]) -> str:
    """XADD raw fields (a poison entry, a replay); return the entry id."""
    entry_id: Any = await redis.xadd(stream, fields)  # type: ignore[arg-type]
    return str(entry_id.decode())


async def entries(redis: Redis, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """Every entry of ``stream``: (id, fields)."""
    found: Any = await redis.xrange(stream)
    return [(entry_id.decode(), fields) for entry_id, fields in found]


async def group_lag(redis: Redis, stream: str, group: str) -> int:
    """Entries of ``stream`` not yet delivered to ``group`` (works on Redis 6.2 too)."""
    for info in await redis.xinfo_groups(stream):
        if info["name"].decode() == group:
            last = info["last-delivered-id"]
            after: Any = await redis.xrange(stream, min=f"({last.decode()}", max="+")
            return len(after)
    return int(await redis.xlen(stream))


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, roles: frozenset[str] = PIPELINE_ROLES, concurrency: int = 2
) -> AsyncIterator[Worker]:
    """Run a ``Worker`` in this test's event loop; stop it gracefully on the way out."""
    worker = Worker(settings, roles, concurrency)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.stop()


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``govflow run`` subprocess configured like ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    assert settings.redis_url is not None
    assert settings.database_url is not None
    env.update(
        GOVFLOW_REDIS_URL=settings.redis_url,
        GOVFLOW_DATABASE_URL=settings.database_url,
        GOVFLOW_PREFIX=settings.prefix,
        GOVFLOW_PARTITIONS=str(settings.partitions),
        GOVFLOW_LEASE_TTL=str(settings.lease_ttl),
        GOVFLOW_CLAIM_IDLE=str(settings.claim_idle),
        GOVFLOW_BACKOFF_BASE=str(settings.backoff_base),
        GOVFLOW_MAX_ATTEMPTS=str(settings.max_attempts),
        GOVFLOW_WEBHOOK_ALLOWED_HOSTS=settings.webhook_allowed_hosts,
        **extra,
    )
    return env


def start_cli_worker(
    settings: Settings, *args: str, stderr: Any = subprocess.DEVNULL, **env: str
) -> subprocess.Popen[bytes]:
    """Start ``govflow run ARGS`` as a subprocess, the way an operator does."""
    return subprocess.Popen(
        [str(GOVFLOW), "run", *args],
        env=worker_env(settings, **env),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def terminate(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM a subprocess this test started; SIGKILL it if it is not gone within ``grace``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Make sure a subprocess this test started is gone (used on the way out)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


async def retry_due(redis: Redis, keys: Keys) -> list[float]:
    """When each retry scheduled in partition 0 is due (Unix seconds), soonest first."""
    scored = await redis.zrange(keys.retry(), 0, -1, withscores=True)
    return [float(entry[1]) / 1000 for entry in scored]
