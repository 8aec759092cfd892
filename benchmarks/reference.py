"""The reference: the bare batched two-hop pipeline, the limit govflow is measured against.

The same job as the peers' (``peer_apps/common.py``), on a schema of its own, read from
the same events govflow's publisher writes, with nothing but the two hops:

1. ``XREADGROUP`` up to 200 events; one multi-row insert of their execution rows (one
   commit); the commands handed on (``XADD``) and the events acknowledged (``XACK``) in
   one round trip;
2. ``XREADGROUP`` up to 200 commands; one statement that inserts the tasks and the
   assignments and marks the executions completed (one commit); ``XACK``.

No retries, claims, fencing, logging, metrics or seal: what is left is the floor of a
batched two-hop design on these servers. ``python -m benchmarks.reference CONCURRENCY``
runs one worker process with ``CONCURRENCY`` consumers per hop; the environment names the
servers, the schema and the key prefix (``BENCH_*``, as the peers').
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg import sql
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from govflow.schemas.keys import Keys

SCHEMA = "bench_reference"  # copies of govflow's tables, as each peer has
ROOT = Path(__file__).resolve().parent.parent
BATCH = 200
BLOCK_MS = 1000
GROUP = "reference"
NAMESPACE = uuid.UUID("6c1f7d4e-3b0a-4f2e-9a51-0c9e7f3d2b18")  # as the peers derive ids

_RECORD = (
    "INSERT INTO {s}.workflow_executions (id, workflow_name, workflow_version, event_id,"
    " entity_type, entity_id, tenant, event_occurred_at)"
    " SELECT id, 'bench-drain', 1, event_id, 'policy', entity_id, 'default', occurred_at"
    " FROM jsonb_to_recordset(%s::jsonb)"
    " AS r(id uuid, event_id text, entity_id text, occurred_at timestamptz)"
    " ON CONFLICT (tenant, event_id, workflow_name) DO NOTHING"
)
_EFFECTS = (
    "WITH r AS MATERIALIZED (SELECT * FROM jsonb_to_recordset(%s::jsonb)"
    " AS r(execution_id uuid, entity_id text, title text, owner text)),"
    " t AS (INSERT INTO {s}.tasks (execution_id, step, entity_id, title, assignee)"
    " SELECT execution_id, 1, entity_id, 'Review ' || title, owner FROM r"
    " ON CONFLICT (execution_id, step) DO NOTHING),"
    " a AS (INSERT INTO {s}.assignments (execution_id, step, entity_id, assignee)"
    " SELECT execution_id, 2, entity_id, 'risk-team' FROM r"
    " ON CONFLICT (execution_id, step) DO NOTHING)"
    " UPDATE {s}.workflow_executions e SET status = 'completed', last_error = NULL,"
    " updated_at = now(), finished_at = now() FROM r WHERE e.id = r.execution_id"
)
_encode = msgspec.json.Encoder().encode


def env(redis_url: str, database_url: str, prefix: str) -> dict[str, str]:
    """The environment of a worker process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    base.update(
        BENCH_REDIS_URL=redis_url,
        BENCH_DATABASE_URL=database_url,
        BENCH_SCHEMA=SCHEMA,
        BENCH_QUEUE=prefix,
        PYTHONPATH=str(ROOT),
    )
    return base


def start(
    processes: int, concurrency: int, env: dict[str, str], log: Path
) -> list[subprocess.Popen[bytes]]:
    """Start ``processes`` worker processes (each in a session of its own, as the peers')."""
    procs = []
    for i in range(processes):
        with (log.parent / f"{log.name}-{i}.log").open("wb") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.reference", str(concurrency)],
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )  # fmt: skip
    return procs


def _statement(template: str, schema: str) -> bytes:
    return sql.SQL(template).format(s=sql.Identifier(schema)).as_string(None).encode()


async def _read(redis: Redis, stream: str, consumer: str) -> list[tuple[bytes, bytes]]:
    """Up to ``BATCH`` new entries: (id, the one field's value)."""
    reply: Any = await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=BATCH, block=BLOCK_MS)
    if not reply:
        return []
    return [(entry_id, next(iter(fields.values()))) for entry_id, fields in reply[0][1]]


async def record(redis: Redis, db: psycopg.AsyncConnection[Any], keys: Keys, name: str) -> None:
    """Hop 1, for good: events in, execution rows and commands out."""
    statement = _statement(_RECORD, os.environ["BENCH_SCHEMA"])
    while True:
        batch = await _read(redis, keys.events(), name)
        if not batch:
            continue
        rows, commands = [], []
        for _, raw in batch:
            event = msgspec.json.decode(raw)
            exec_id = str(uuid.uuid5(NAMESPACE, f"{event['id']}\x1fbench-drain"))
            rows.append(
                {"id": exec_id, "event_id": event["id"], "entity_id": event["entity_id"],
                 "occurred_at": event["occurred_at"]}
            )  # fmt: skip
            commands.append(_encode({"execution_id": exec_id, "event": event}))
        await db.execute(statement, (_encode(rows).decode(),))
        await db.commit()
        pipe = redis.pipeline(transaction=False)
        for command in commands:
            pipe.xadd(keys.commands(), {b"command": command})
        pipe.xack(keys.events(), GROUP, *[entry_id for entry_id, _ in batch])
        await pipe.execute()


async def effects(redis: Redis, db: psycopg.AsyncConnection[Any], keys: Keys, name: str) -> None:
    """Hop 2, for good: commands in, tasks, assignments and completions out."""
    statement = _statement(_EFFECTS, os.environ["BENCH_SCHEMA"])
    while True:
        batch = await _read(redis, keys.commands(), name)
        if not batch:
            continue
        rows = []
        for _, raw in batch:
            command = msgspec.json.decode(raw)
            event = command["event"]
            rows.append(
                {"execution_id": command["execution_id"], "entity_id": event["entity_id"],
                 "title": event["data"]["title"], "owner": event["data"]["owner"]}
            )  # fmt: skip
        await db.execute(statement, (_encode(rows).decode(),))
        await db.commit()
        await redis.xack(keys.commands(), GROUP, *[entry_id for entry_id, _ in batch])


async def main(concurrency: int) -> None:
    """Run ``concurrency`` consumers of each hop until killed."""
    keys = Keys(os.environ["BENCH_QUEUE"])
    redis = Redis.from_url(os.environ["BENCH_REDIS_URL"], max_connections=4 * concurrency)
    for stream in (keys.events(), keys.commands()):
        try:
            await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):  # another process made it
                raise
    tag = f"{os.getpid()}"
    hops = []
    for i in range(concurrency):
        for hop in (record, effects):
            db = await psycopg.AsyncConnection.connect(os.environ["BENCH_DATABASE_URL"])
            hops.append(hop(redis, db, keys, f"{tag}-{hop.__name__}-{i}"))
    await asyncio.gather(*hops)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
