"""The backlog scenario: does the cost of an event stay flat as the backlog grows?

Each size drains on servers of its own, started for it (tables and streams as fresh as
after a deploy: no statistics, no history), unless ``GOVFLOW_BENCH_*`` names servers, which
are then reused with truncated tables. Per size: the drain's events/s, the CPU Postgres
spent per event, the workers' peak RSS, and Redis's memory when the backlog is in, when it
is drained, and once the janitor has trimmed both streams back to ``GOVFLOW_RETENTION``
entries (how long that took after the drain is ``trimmed_after_s``). One size is also
drained by 1, 2 and 4 worker processes, each on servers of its own: whether a worker's peak
RSS stays flat however the backlog is shared out.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from benchmarks import cpu, gf, workload
from benchmarks.servers import servers
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings

CHUNK = 10_000  # events built and published at a time, so the harness stays small
TRIM_TIMEOUT_S = 60.0  # the janitor sweeps every 5 s: this is a dozen sweeps
RETENTION = Settings().retention  # the workers run with the default


def _publish(redis_url: str, prefix: str, run: str, n: int) -> float:
    """Publish a run's ``n`` events in chunks; return the seconds it took."""
    return sum(
        gf.publish(redis_url, prefix, gf.events(run, min(CHUNK, n - start), start))
        for start in range(0, n, CHUNK)
    )


def _redis_mb(client: redis.Redis) -> float:
    return round(int(client.info("memory")["used_memory"]) / 2**20, 1)


def _lengths(client: redis.Redis, keys: Keys) -> list[int]:
    return [int(client.xlen(stream)) for stream in (keys.events(), keys.commands())]


def _trimmed_after(client: redis.Redis, keys: Keys) -> float | None:
    """Seconds until both streams hold no more than ``RETENTION`` entries; None: not then."""
    started = time.monotonic()
    while time.monotonic() - started < TRIM_TIMEOUT_S:
        if max(_lengths(client, keys)) <= RETENTION:
            return round(time.monotonic() - started, 1)
        time.sleep(0.2)
    return None


def drain(
    run: str, n: int, *, processes: int, concurrency: int, logs: Path, tag: str
) -> dict[str, Any]:
    """Drain a backlog of ``n`` events on servers of its own; return what was measured."""
    with servers() as found:
        db, url, prefix = found.database_url, found.redis_url, f"{tag}-{run}"
        gf.setup(db)
        workload.reset(db, "public")
        keys, client = Keys(prefix), redis.Redis.from_url(url)
        try:
            published_s = _publish(url, prefix, run, n)
            published_mb = _redis_mb(client)
            pg_before, started = _pg_cpu(found.pids), time.monotonic()
            procs = gf.start(
                processes, gf.env(url, db, prefix), logs / f"govflow-{run}", concurrency
            )
            try:
                workload.wait_completed(db, "public", n, like=f"{run}-%", alive=_alive(procs))
                wall = time.monotonic() - started
                pg_s = _pg_cpu(found.pids) - pg_before
                worker_s = cpu.trees_cpu([p.pid for p in procs])
                drained_mb = _redis_mb(client)
                trimmed_after_s = _trimmed_after(client, keys)
                trimmed_mb, lengths = _redis_mb(client), _lengths(client, keys)
            finally:
                peaks = gf.stop(procs)
                gf.cleanup(url, prefix)
        finally:
            client.close()
        result = workload.measure(
            db, "public", like=f"{run}-%", commit_ts=workload.commit_timestamps(db)
        )
        return {
            "events": result.events,
            "processes": processes,
            "events_per_s": result.events_per_s,
            "seconds": result.seconds,
            "wall_s": round(wall, 1),
            "publish_events_per_s": round(n / published_s),
            "fresh_servers": "postgres" in found.pids and "redis" in found.pids,
            "postgres_us_per_event": round(1e6 * pg_s / n, 1) if "postgres" in found.pids else None,
            "worker_us_per_event": round(1e6 * worker_s / n, 1),  # start-up included
            "peak_rss_mb": round(max(peaks) / 1024, 1) if peaks else None,
            "redis_mb": {"published": published_mb, "drained": drained_mb, "trimmed": trimmed_mb},
            "trimmed_after_s": trimmed_after_s,
            "stream_lengths": lengths,  # events, commands, once trimmed (or at the time-out)
        }


def _pg_cpu(pids: dict[str, int]) -> float:
    return cpu.tree_cpu(pids["postgres"]) if "postgres" in pids else 0.0


def _alive(procs: list[subprocess.Popen[bytes]]) -> Any:
    return lambda: all(p.poll() is None for p in procs)
