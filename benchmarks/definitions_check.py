"""What reading the workflows' generation once per batch costs (``consumers.definitions``).

``uv run python -m benchmarks.definitions_check [DATABASE_URL]`` (default: the
``GOVFLOW_BENCH_DATABASE_URL`` or a local Postgres) migrates a scratch database, applies
two definitions, and times ``Definitions.enabled()`` when nothing changed (one
single-row SELECT on a pooled connection) and when the generation moved (that read plus
the reload). The database is dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import time
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import make_conninfo

from govflow.consumers.definitions import Definitions
from govflow.db.migrate import migrate
from govflow.db.pool import open_pool
from govflow.db.workflows import apply_workflow
from govflow.schemas.codec import decode_workflow

CALLS = 2_000
RELOADS = 200
WORKFLOW = """
name: bench-{n}
entity: policy
trigger: create
actions:
  - create_task: {{title: "Review {{data.title}}", assignee: "{{data.owner}}"}}
"""


async def _timed(calls: int, call: Any) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


async def measure(server_url: str) -> dict[str, float]:
    """Median and p99 in microseconds, unchanged and reloading."""
    name = f"gf_defs_{secrets.token_hex(3)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(server_url, dbname=name)
    try:
        await migrate(url)
        pool = await open_pool(url, max_size=2)
        async with pool:
            async with pool.connection() as conn:
                for n in range(2):
                    await apply_workflow(conn, decode_workflow(WORKFLOW.format(n=n), "bench"))
            definitions = Definitions(pool)
            await definitions.enabled()
            same = await _timed(CALLS, definitions.enabled)

            bumped = []
            for _ in range(RELOADS):
                async with pool.connection() as conn:  # a statement trigger fires anyway
                    await conn.execute("UPDATE workflows SET enabled = enabled WHERE false")
                bumped += await _timed(1, definitions.enabled)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return {
        "unchanged_median_us": statistics.median(same),
        "unchanged_p99_us": statistics.quantiles(same, n=100)[98],
        "reload_median_us": statistics.median(bumped),
    }


def main() -> None:
    """Print the measurement as ``name value`` lines."""
    default = os.environ.get(
        "GOVFLOW_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres"
    )
    url = sys.argv[1] if len(sys.argv) > 1 else default
    for key, value in anyio.run(measure, url).items():
        print(f"{key} {value:.0f}")


if __name__ == "__main__":
    main()
