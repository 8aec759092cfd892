"""What one reconciler sweep costs: in Postgres, and in Redis (which a script blocks).

``uv run python -m benchmarks.reconcile`` starts its own servers (or uses
``GOVFLOW_BENCH_REDIS_URL`` / ``GOVFLOW_BENCH_DATABASE_URL``), fills a scratch database with
``--history`` finished executions and ``--unfinished`` fresh unfinished ones, then times
sweeps in these states:

- ``idle``: nothing overdue (the common case: two index probes);
- ``lost``: a full batch of overdue executions that Redis lost, put back;
- ``full_scan``: a full batch overdue behind a backlog of commands as large as the trace
  script reads (its worst case per place: it concludes nothing and puts nothing back);
- ``trace_script``: that script alone, the time Redis is blocked plus one round trip.

It prints one JSON document; docs/RELIABILITY.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from typing import Any

import anyio
import msgspec
import psycopg
from redis.asyncio import Redis

from benchmarks.servers import servers
from govflow.consumers.reconcile import BATCH, SCAN_LIMIT, Reconciler
from govflow.consumers.streams import COMMAND_FIELD, Streams
from govflow.db.migrate import migrate
from govflow.db.pool import open_pool
from govflow.db.reconcile import count_overdue
from govflow.db.workflows import apply_workflow
from govflow.schemas.codec import decode_workflow, encode
from govflow.schemas.keys import Keys

WORKFLOW = """
name: bench-reconcile
entity: policy
trigger: create
actions:
  - assign: {assignee: a}
"""

_FILL = (
    "INSERT INTO workflow_executions (id, workflow_name, workflow_version, event_id,"
    " entity_type, entity_id, tenant, status, updated_at)"
    " SELECT gen_random_uuid(), 'bench-reconcile', 1, %(tag)s || i, 'policy', 'POL-' || i,"
    " 'default', %(status)s, now() - make_interval(secs => %(age)s)"
    " FROM generate_series(1, %(n)s) i"
)
_EVENTS = (
    "INSERT INTO received_events (tenant, event_id, event)"
    " SELECT tenant, event_id, jsonb_build_object('id', event_id, 'type', 'policy.created',"
    " 'tenant', tenant, 'entity_id', entity_id, 'occurred_at', '2026-01-01T00:00:00Z')::text"
    " FROM workflow_executions WHERE event_id LIKE %s"
)


async def _timed(call: Any, runs: int) -> tuple[float, Any]:
    """The median milliseconds of ``runs`` calls, and the last result."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = await call()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2), result


async def measure(
    redis_url: str, database_url: str, history: int, unfinished: int
) -> dict[str, Any]:
    """Fill, sweep, and report."""
    await migrate(database_url)
    keys = Keys(f"gfb{secrets.token_hex(3)}")
    pool = await open_pool(database_url, max_size=2)
    redis = Redis.from_url(redis_url)
    try:
        async with pool.connection() as conn:
            await apply_workflow(conn, decode_workflow(WORKFLOW, "bench"))
            await conn.execute(_FILL, _rows("h", "completed", 86_400, history))
            await conn.execute(_FILL, _rows("u", "queued", 0, unfinished))
            await conn.execute("ANALYZE workflow_executions")
        reconciler = Reconciler(Streams(redis), pool, keys, after_s=60.0)
        report: dict[str, Any] = {"history": history, "unfinished": unfinished, "batch": BATCH}
        report["idle_sweep_ms"], _ = await _timed(reconciler.sweep, 20)
        async with pool.connection() as conn:
            report["lag_overdue_count_ms"], _ = await _timed(lambda: count_overdue(conn, 60.0), 20)

        async with pool.connection() as conn:
            await conn.execute(_FILL, _rows("l", "queued", 3600, BATCH))
            await conn.execute(_EVENTS, ("l%",))
        report["lost_sweep_ms"], lost = await _timed(reconciler.sweep, 1)
        report["lost_reemitted"] = lost.reemitted
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE workflow_executions SET updated_at = now() - interval '1 hour'"
                " WHERE event_id LIKE 'l%'"
            )
        command = encode({"command": "run", "execution_id": "00000000-0000-0000-0000-000000000000"})
        pipe = redis.pipeline(transaction=False)
        for _ in range(SCAN_LIMIT - 1):
            pipe.xadd(keys.commands(), {COMMAND_FIELD: command})
        await pipe.execute()
        await redis.xadd(keys.commands(), {COMMAND_FIELD: command})
        report["full_scan_sweep_ms"], full = await _timed(reconciler.sweep, 5)
        report["full_scan_reemitted"] = full.reemitted
        report["scan_limit"] = SCAN_LIMIT
        # The trace script alone: the time Redis is blocked, plus one round trip.
        place = reconciler._place(0)
        ids = [str(i) for i in range(BATCH)]
        streams = Streams(redis)
        report["trace_script_ms"], _ = await _timed(
            lambda: streams.traces(place, ids, ids, ids, SCAN_LIMIT), 5
        )
        return report
    finally:
        await redis.delete(keys.commands())
        await redis.aclose()
        await pool.close()


def _rows(tag: str, status: str, age_s: int, n: int) -> dict[str, Any]:
    return {"tag": tag, "status": status, "age": age_s, "n": n}


def main() -> None:
    """Parse the arguments, run against fresh servers, print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--unfinished", type=int, default=10_000)
    args = parser.parse_args()
    with servers() as found:
        name = f"gfb_reconcile_{secrets.token_hex(3)}"
        with psycopg.connect(found.database_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}".encode())
        url = found.database_url.rsplit("/", 1)[0] + f"/{name}"
        try:
            result = anyio.run(measure, found.redis_url, url, args.history, args.unfinished)
        finally:
            with psycopg.connect(found.database_url, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())
    print(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())


if __name__ == "__main__":
    main()
