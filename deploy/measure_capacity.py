"""Measure what worker processes drain, and what each event costs Redis and Postgres.

The figures in ``deploy/SCALING.md`` come from this script. It is a quick probe, not the
benchmark (``benchmarks/`` runs govflow against its peers). It creates a database of its
own on the Postgres server and applies ``deploy/examples``; starts ``--processes``
``govflow run`` workers under a fresh key prefix and waits until each is reading; then
publishes ``--events`` events and times the drain, from the first publish to the last
completed execution, reading the servers' own counters before and after:

- Postgres: commits, rows inserted and updated, WAL bytes and database size
  (``pg_stat_database``, ``pg_current_wal_lsn``, ``pg_database_size``), and the CPU
  time of the postmaster and its children;
- Redis: commands run (``INFO commandstats``, the publishes included) and its CPU time;
- the workers: the CPU time of their processes.

Give it servers of its own: the WAL position, the command counts and the CPU times are
the whole server's, so another user of the same servers inflates them. The Postgres
user must be a superuser on the same host (the probe reads ``postmaster.pid``) and may
CREATE DATABASE; the probe drops what it made::

    uv run python deploy/measure_capacity.py --redis-url redis://127.0.0.1:6390/0 \
        --database-url postgresql://postgres@127.0.0.1:5440/postgres --events 5000
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
import psutil  # type: ignore[import-untyped]
import psycopg
from redis.asyncio import Redis

from govflow.db.migrate import migrate
from govflow.db.workflows import apply_workflow
from govflow.producers.publish import Publisher
from govflow.runtime.log import configure_logging
from govflow.schemas.codec import decode_workflow
from govflow.schemas.events import Change, Event, new_event
from govflow.schemas.keys import Keys

EXAMPLES = Path(__file__).resolve().parent / "examples"
GOVFLOW = Path(sys.executable).parent / "govflow"

# What each workload publishes, and what it makes govflow do with deploy/examples applied.
#   light: policy.created -> new-policy-review: 1 execution, 2 steps (create_task, assign).
#   full:  policy.status_changed to pending_approval, high risk, owner changed ->
#          high-risk-policy-approval: 1 execution, 4 steps (create_approval, create_task,
#          assign, change_status); change_status writes an outbox row, the relay publishes
#          the chained event and the trigger matcher reads it (it matches no workflow).
WORKLOADS = {"light": 2, "full": 4}  # steps per execution


class Snapshot(msgspec.Struct, frozen=True):
    """The servers' counters at one instant."""

    at: float
    commits: int
    inserted: int
    updated: int
    deleted: int
    wal_bytes: int
    db_bytes: int
    pg_cpu_s: float
    redis_calls: int
    redis_cpu_s: float


def events_for(workload: str, count: int) -> Iterator[Event]:
    """``count`` events of ``workload``, each for an entity of its own."""
    for i in range(count):
        entity = f"POL-{i:06d}"
        if workload == "light":
            yield new_event(
                "policy.created",
                entity,
                tenant=f"tenant-{i % 10}",
                data={"title": f"Policy {i}", "owner": f"user-{i % 50}", "status": "draft"},
            )
        else:
            yield new_event(
                "policy.status_changed",
                entity,
                tenant=f"tenant-{i % 10}",
                data={
                    "title": f"Policy {i}",
                    "owner": f"user-{i % 50}",
                    "status": "pending_approval",
                    "risk": "high",
                },
                changes={
                    "status": Change(from_="draft", to="pending_approval"),
                    "owner": Change(from_="user-0", to=f"user-{i % 50}"),
                },
            )


def process_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and their children."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            family = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        for p in family:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
    return total


class Servers(msgspec.Struct, frozen=True):
    """The process ids of the Redis server and the Postgres postmaster we measure."""

    redis_pid: int
    postmaster_pid: int

    @classmethod
    async def find(cls, redis: Redis, conn: psycopg.AsyncConnection[Any]) -> Servers:
        """Ask each server where it runs (the Postgres user must be a superuser)."""
        info = await redis.info("server")
        cur = await conn.execute("SHOW data_directory")
        row = await cur.fetchone()
        assert row is not None
        postmaster = (Path(row[0]) / "postmaster.pid").read_text().split()[0]
        return cls(redis_pid=int(info["process_id"]), postmaster_pid=int(postmaster))


async def snapshot(redis: Redis, conn: psycopg.AsyncConnection[Any], servers: Servers) -> Snapshot:
    """Read the counters of both servers."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    cur = await conn.execute(
        "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted,"
        " pg_current_wal_lsn() - '0/0'::pg_lsn, pg_database_size(datname)"
        " FROM pg_stat_database WHERE datname = current_database()"
    )
    row = await cur.fetchone()
    assert row is not None
    stats = await redis.info("commandstats")
    cpu = await redis.info("cpu")
    return Snapshot(
        at=time.monotonic(),
        commits=int(row[0]),
        inserted=int(row[1]),
        updated=int(row[2]),
        deleted=int(row[3]),
        wal_bytes=int(row[4]),
        db_bytes=int(row[5]),
        pg_cpu_s=process_cpu([servers.postmaster_pid]),
        redis_calls=sum(int(v["calls"]) for v in stats.values()),
        redis_cpu_s=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
    )


async def drained(
    redis: Redis, conn: psycopg.AsyncConnection[Any], keys: Keys, expected: int, relay: bool
) -> bool:
    """Every execution completed, and (with the relay) every chained event handled."""
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'completed'),"
        " (SELECT count(*) FROM outbox WHERE published_at IS NULL)"
        " FROM workflow_executions"
    )
    row = await cur.fetchone()
    assert row is not None
    if row[0] < expected or (relay and row[1] > 0):
        return False
    for group in await redis.xinfo_groups(keys.events()):
        if group["name"] == b"triggers" and (group["lag"] or group["pending"]):
            return False
    return True


async def wait_ready(redis: Redis, readers: int, within: float) -> None:
    """Wait until ``readers`` clients sit in a blocking XREADGROUP (the workers are up)."""
    # Not XINFO CONSUMERS: Redis 7.0 creates a consumer only when it is served an entry.
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        clients = await redis.client_list()
        if sum(1 for c in clients if c.get("cmd") == "xreadgroup") >= readers:
            return
        await anyio.sleep(0.1)
    raise SystemExit(f"the workers were not reading within {within}s")


def start(command: list[str], env: dict[str, str], count: int) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` worker processes (a fork and an exec each: nothing to wait for)."""
    return [subprocess.Popen(command, env=env) for _ in range(count)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker and wait for it to exit."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(60)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Set up, start the workers, publish, time the drain; return the figures."""
    server_url: str = args.database_url
    dbname = f"govflow_capacity_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')
    database_url = urlunsplit(urlsplit(server_url)._replace(path=f"/{dbname}", query=""))
    prefix = f"capacity-{secrets.token_hex(4)}"
    keys = Keys(prefix)
    relay = args.relay
    roles = ["triggers", "actions", *(["relay"] if relay else [])]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")},
        "GOVFLOW_REDIS_URL": args.redis_url,
        "GOVFLOW_DATABASE_URL": database_url,
        "GOVFLOW_PREFIX": prefix,
        "GOVFLOW_BATCH_SIZE": str(args.batch_size),
    }
    command = [str(GOVFLOW), "--log-level", "warning", "run", "--role", ",".join(roles)]
    command += ["--concurrency", str(args.concurrency)]
    redis = Redis.from_url(args.redis_url)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await migrate(database_url)
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            for path in sorted(EXAMPLES.glob("*.yaml")):
                await apply_workflow(conn, decode_workflow(path.read_bytes(), str(path)))
            await conn.commit()
        events = list(events_for(args.workload, args.events))
        procs = start(command, env, args.processes)
        # Two groups, ``--concurrency`` consumers each, per process.
        await wait_ready(redis, 2 * args.processes * args.concurrency, args.timeout)
        workers = [p.pid for p in procs]
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            servers = await Servers.find(redis, conn)
            load_before = os.getloadavg()[0]
            before = await snapshot(redis, conn, servers)
            cpu_before = process_cpu(workers)
            async with Publisher(redis, keys) as publisher:
                for i in range(0, len(events), 500):
                    await publisher.publish_many(events[i : i + 500])
            publish_s = time.monotonic() - before.at
            deadline = time.monotonic() + args.timeout
            while not await drained(redis, conn, keys, args.events, relay):
                if time.monotonic() > deadline:
                    raise SystemExit(f"not drained within {args.timeout}s")
                await anyio.sleep(0.05)
            # Time and CPU now: the workers' Postgres backends exit with them.
            at_drain = await snapshot(redis, conn, servers)
            worker_cpu = process_cpu(workers) - cpu_before
            load_after = os.getloadavg()[0]
            stop(procs)
            # Rows and commits once the workers are gone: a backend reports its
            # statistics when it exits (an idle one only every few seconds).
            stopped = await snapshot(redis, conn, servers)
            cur = await conn.execute("SELECT count(*) FROM execution_steps")
            row = await cur.fetchone()
            assert row is not None
            steps = int(row[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        await redis.delete(keys.events(), keys.commands(), keys.retry(), keys.dead())
        await redis.aclose()
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    n = args.events
    seconds = at_drain.at - before.at
    pg_cpu = at_drain.pg_cpu_s - before.pg_cpu_s
    redis_cpu = at_drain.redis_cpu_s - before.redis_cpu_s
    return {
        "workload": args.workload,
        "relay": relay,
        "events": n,
        "steps": steps,
        "processes": args.processes,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "publish_events_per_s": round(n / publish_s),
        "drain_seconds": round(seconds, 2),
        "events_per_s": round(n / seconds, 1),
        "per_event": {
            "pg_commits": round((stopped.commits - before.commits) / n, 4),
            "pg_rows_inserted": round((stopped.inserted - before.inserted) / n, 2),
            "pg_rows_updated": round((stopped.updated - before.updated) / n, 2),
            "pg_rows_deleted": round((stopped.deleted - before.deleted) / n, 2),
            "pg_wal_bytes": round((stopped.wal_bytes - before.wal_bytes) / n),
            "pg_disk_bytes": round((stopped.db_bytes - before.db_bytes) / n),
            "redis_commands": round((at_drain.redis_calls - before.redis_calls) / n, 2),
        },
        "cpu_ms_per_event": {
            "workers": round(1000 * worker_cpu / n, 3),
            "postgres": round(1000 * pg_cpu / n, 3),
            "redis": round(1000 * redis_cpu / n, 3),
        },
        "cores_busy": {
            "workers": round(worker_cpu / seconds, 2),
            "postgres": round(pg_cpu / seconds, 2),
            "redis": round(redis_cpu / seconds, 2),
        },
        "host_cores": psutil.cpu_count(),
        "host_load_1m": [round(load_before, 2), round(load_after, 2)],
    }


def main() -> None:
    """Parse the arguments, measure once, print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--database-url", required=True, help="a server we may CREATE DATABASE on")
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="light")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--relay", action="store_true", help="also run the outbox relay")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    configure_logging(level="warning")
    result = anyio.run(measure, args)
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(result), indent=2).decode() + "\n")


if __name__ == "__main__":
    main()
