"""govflow's side of the benchmark: publish with ``govflow.Publisher``, run worker processes.

Each worker process is ``govflow run --role triggers,actions`` (``python -m govflow.cli``), as a
user runs it: JSON logs at ``info`` on stderr, ``--concurrency`` consumers per group. So
govflow is measured as separate processes, like every peer.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from importlib.metadata import version as dist_version
from pathlib import Path

import anyio
import httpx
import msgspec
import psycopg

from benchmarks import cpu
from benchmarks.cluster import lease_owners
from benchmarks.workload import WORKFLOW, StalledError, WorkerDiedError, event_fields
from govflow.core.connect import connect
from govflow.db.migrate import migrate
from govflow.db.workflows import apply_workflow
from govflow.producers.publish import Publisher
from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import GROUP_OF, Keys
from govflow.schemas.workflows import Workflow

ROOT = Path(__file__).resolve().parent.parent
PUBLISH_CHUNK = 1000  # events per publish_many call
STOP_TIMEOUT = 40.0
BALANCE_TIMEOUT = 120.0  # for the workers' partition leases to settle


def version() -> str:
    """govflow's version."""
    return dist_version("govflow")


async def _setup(database_url: str) -> None:
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await apply_workflow(conn, msgspec.convert(WORKFLOW, Workflow))
        await conn.commit()


def setup(database_url: str) -> None:
    """Migrate the database and register the benchmark's workflow."""
    anyio.run(_setup, database_url)


def events(run: str, n: int, start: int = 0, kind: str = "policy.created") -> list[Event]:
    """The events of a run, built (and timestamped) now; ``kind`` is their type."""
    out = []
    for i in range(start, start + n):
        f = event_fields(run, i)
        out.append(
            new_event(
                kind,
                f["entity_id"],
                data={"title": f["title"], "owner": f["owner"], "status": "draft"},
                id=f["id"],
            )
        )
    return out


async def _publish(redis_url: str, keys: Keys, batch: list[Event]) -> float:
    async with await Publisher.connect(redis_url, keys) as publisher:
        started = time.perf_counter()
        for i in range(0, len(batch), PUBLISH_CHUNK):
            await publisher.publish_many(batch[i : i + PUBLISH_CHUNK])
        return time.perf_counter() - started


def publish(redis_url: str, prefix: str, batch: list[Event], partitions: int = 1) -> float:
    """Publish built events with ``publish_many``; return the seconds it took.

    The URL may name a Redis Cluster node; the events then spread over ``partitions``.
    """
    return anyio.run(_publish, redis_url, Keys(prefix, partitions), batch)


async def _paced(redis_url: str, prefix: str, run: str, n: int, rate: float) -> float:
    async with Publisher.from_url(redis_url, Keys(prefix)) as publisher:
        sent, started = 0, time.perf_counter()
        while sent < n:
            due = min(n, int((time.perf_counter() - started) * rate) + 1)
            if due <= sent:
                await anyio.sleep(max(0.0, sent / rate - (time.perf_counter() - started)))
                continue
            await publisher.publish_many(events(run, due - sent, sent))
            sent = due
        return time.perf_counter() - started


def publish_paced(redis_url: str, prefix: str, run: str, n: int, rate: float) -> float:
    """Publish ``n`` events at ``rate`` per second, each stamped as it is sent."""
    return anyio.run(_paced, redis_url, prefix, run, n, rate)


def env(redis_url: str, database_url: str, prefix: str, partitions: int = 1) -> dict[str, str]:
    """The environment of a worker process: the harness's own, with govflow's settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    base.update(
        GOVFLOW_REDIS_URL=redis_url,
        GOVFLOW_DATABASE_URL=database_url,
        GOVFLOW_PREFIX=prefix,
        GOVFLOW_PARTITIONS=str(partitions),
        PYTHONPATH=str(ROOT),
    )
    return base


async def _lease_holders(redis_url: str, keys: Keys) -> dict[str, list[str | None]]:
    client = await connect(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        return {group: await lease_owners(client, keys, group) for group in GROUP_OF.values()}
    finally:
        await client.aclose()


def _fair(owners: list[str | None], workers: int) -> bool:
    """Every partition leased, each of ``workers`` holding its fair share and no more."""
    counts = Counter(owners)
    share = math.ceil(len(owners) / workers)
    return (
        None not in counts
        and len(counts) == min(workers, len(owners))
        and max(counts.values()) <= share
    )


def wait_balanced(redis_url: str, keys: Keys, workers: int, alive: Callable[[], bool]) -> None:
    """Wait until, in every group, ``workers`` share the partitions fairly.

    Raises:
        WorkerDiedError: a worker exited meanwhile.
        StalledError: the leases did not settle within ``BALANCE_TIMEOUT``.
    """
    deadline = time.monotonic() + BALANCE_TIMEOUT
    while True:
        holders = anyio.run(_lease_holders, redis_url, keys)
        if all(_fair(owners, workers) for owners in holders.values()):
            return
        if not alive():
            raise WorkerDiedError(f"a worker exited before the leases settled: {holders}")
        if time.monotonic() > deadline:
            raise StalledError(f"the leases did not settle: {holders}")
        time.sleep(0.2)


def start(
    processes: int,
    env: dict[str, str],
    log: Path,
    concurrency: int,
    wrap: Callable[[int], list[str]] | None = None,
    metrics_ports: list[int] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start ``processes`` worker processes; their logs go to ``log``-N.log.

    Args:
        processes: how many.
        env: their environment (``env()``).
        log: the stem of their log files.
        concurrency: consumers per role in each.
        wrap: the command that runs worker N (a profiler), before the worker's own.
        metrics_ports: where worker N serves its Prometheus metrics.
    """
    procs = []
    for i in range(processes):
        cmd = [sys.executable, "-m", "govflow.cli", "run", "--role", "triggers,actions",
               "--concurrency", str(concurrency)]  # fmt: skip
        if metrics_ports:
            cmd += ["--metrics-port", str(metrics_ports[i])]
        with (log.parent / f"{log.name}-{i}.log").open("wb") as err:
            procs.append(
                subprocess.Popen(
                    [*(wrap(i) if wrap else []), *cmd],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                )
            )  # fmt: skip
    return procs


def stop(procs: list[subprocess.Popen[bytes]], *, wrapped: bool = False) -> list[int]:
    """SIGTERM the workers, wait for them; return each one's peak RSS in KiB (VmHWM).

    A wrapped worker (under a profiler) gets the signal itself, so that the profiler
    sees it exit and writes its profile.
    """
    peaks = []
    for proc in procs:
        if proc.poll() is None:
            for pid in (cpu.children(proc.pid) if wrapped else []) or [proc.pid]:
                if (peak := cpu.peak_rss_kb(pid)) is not None:
                    peaks.append(peak)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return peaks


_SAMPLE = re.compile(
    r'^(govflow_handler_seconds|govflow_batch_entries)_(sum|count)\{group="(\w+)"\} (\S+)$'
)


def batches(ports: list[int]) -> dict[str, dict[str, float]]:
    """Per group, over the workers: batches handled, their mean size and handling time.

    Read from the workers' own ``/metrics`` (``govflow_batch_entries``,
    ``govflow_handler_seconds``): small batches mean the pipeline waits on round trips.
    """
    sums: dict[tuple[str, str, str], float] = {}
    for port in ports:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            if m := _SAMPLE.match(line):
                key = (m[3], m[1], m[2])
                sums[key] = sums.get(key, 0.0) + float(m[4])
    out = {}
    for group in sorted({g for g, _, _ in sums}):
        count = sums.get((group, "govflow_batch_entries", "count"), 0.0)
        entries = sums.get((group, "govflow_batch_entries", "sum"), 0.0)
        handled = sums.get((group, "govflow_handler_seconds", "sum"), 0.0)
        out[group] = {
            "batches": count,
            "mean_entries": round(entries / count, 1) if count else 0.0,
            "handler_s": round(handled, 2),
            "mean_handler_ms": round(1000 * handled / count, 1) if count else 0.0,
        }
    return out


async def _cleanup(redis_url: str, prefix: str) -> None:
    client = await connect(redis_url)
    try:
        # On a cluster, SCAN visits every primary and UNLINK is split by slot.
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


def cleanup(redis_url: str, prefix: str) -> None:
    """Delete a run's keys: every key whose name starts with ``prefix``."""
    anyio.run(_cleanup, redis_url, prefix)
