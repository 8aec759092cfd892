"""``python -m benchmarks --profile``: one govflow drain with py-spy on every worker.

py-spy (installed in the peers' venv) samples each worker process while it drains the
backlog, idle time excluded, and this module sums the samples by function (self and
inclusive) and by library, into ``out/profile.txt``. The Postgres side goes there too:
each statement's time within Postgres over the drain, from ``pg_stat_statements`` (loaded
into the Postgres the benchmark starts; triggers, such as foreign-key checks, count in the
statement that fired them). Findings belong in README.md.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg

from benchmarks import peers

PY_SPY = peers.VENV / "bin" / "py-spy"
RATE = 200  # samples per second
STATEMENTS = "pg_stat_statements"  # the library Postgres must preload
_STATEMENTS_SQL = (
    "SELECT total_exec_time, calls, rows, wal_bytes, wal_fpi,"
    " regexp_replace(query, '\\s+', ' ', 'g')"
    " FROM pg_stat_statements WHERE query NOT LIKE '%%pg_stat_statements%%'"
    " ORDER BY total_exec_time DESC LIMIT %s"
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def available() -> bool:
    """Whether py-spy is installed."""
    return PY_SPY.exists()


def wrap(out: Path) -> Callable[[int], list[str]]:
    """The py-spy command that runs worker N and writes its samples to out/profile-N.raw."""

    def command(i: int) -> list[str]:
        return [str(PY_SPY), "record", "--format", "raw", "--nonblocking", "--rate", str(RATE),
                "-o", str(out / f"profile-{i}.raw"), "--"]  # fmt: skip

    return command


# The subpackages of govflow: a frame in one of them is govflow's own code.
GOVFLOW_ROOMS = (
    "schemas",
    "db",
    "core",
    "plugins",
    "consumers",
    "producers",
    "cli",
    "api",
    "runtime",
    "operations",
)
# What a frame's file belongs to, for the "where the time goes" view; first match wins.
CATEGORIES = (
    ("logging (structlog, runtime/log.py)", ("structlog/", "govflow/runtime/log.py", "/logging/")),
    ("Redis client (redis-py, hiredis)", ("redis/", "hiredis")),
    ("Postgres client (psycopg, pool)", ("psycopg",)),
    ("JSON codec (msgspec, schemas/codec.py)", ("msgspec", "govflow/schemas/codec.py")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("event loop (asyncio, anyio, selectors)", ("asyncio/", "anyio/", "selectors.py")),
    ("govflow's own code", tuple(f"govflow/{room}/" for room in GOVFLOW_ROOMS)),
)  # fmt: skip
# Samples outside the running event loop are start-up (imports) or shutdown.
LOOP_FRAME = "run_forever"


def category(path: str) -> str:
    """The category of a frame's file."""
    for name, needles in CATEGORIES:
        if any(n in path for n in needles):
            return name
    return "other (stdlib: uuid, dataclasses, ...)"


def summarize(raws: list[Path], top: int = 25) -> str:
    """Self time by category and by function, and inclusive time, of the running workers."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    total = startup = 0
    for raw in raws:
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [(m["func"], m["file"]) for f in stack.split(";") if (m := _FRAME.match(f))]
            if not frames or not any(LOOP_FRAME in func for func, _ in frames):
                startup += n
                continue
            total += n
            func, file = frames[-1]
            own[f"{func} ({file})"] += n
            kinds[category(file)] += n
            for name in {f"{f} ({p})" for f, p in frames}:
                inclusive[name] += n
    if total == 0:
        return "no samples\n"
    head = f"{total} samples of busy worker time in the event loop at {RATE} Hz"
    lines = [f"{head} ({startup} more at start-up and shutdown, left out)", "", "by category:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in kinds.most_common()]
    lines += ["", "self time by function:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time by function:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(2 * top)]
    return "\n".join(lines) + "\n"


def watch_statements(database_url: str) -> str | None:
    """Start counting Postgres statements afresh; the reason when it cannot."""
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"CREATE EXTENSION IF NOT EXISTS {STATEMENTS}")
            conn.execute(f"SELECT {STATEMENTS}_reset()")
    except psycopg.Error as e:
        return f"{STATEMENTS} is not available ({str(e).strip()})"
    return None


def statements(database_url: str, events: int, top: int = 12) -> str:
    """The statements that took most time within Postgres, per event of the drain."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(_STATEMENTS_SQL, (top,)).fetchall()
    total = sum(row[0] for row in rows)
    head = f"time within Postgres by statement (top {top}), per event of {events}"
    columns = "the WAL it wrote an event, and the full-page images in it"
    lines = [f"{head}; wall clock, so a backend's waits for a core count too; {columns}:"]
    for ms, calls, affected, wal_bytes, images, query in rows:
        lines.append(
            f"  {1000 * ms / events:6.1f} us {100 * ms / total:5.1f}%"
            f" {int(wal_bytes) / events:7.0f} B WAL {images / events:5.2f} FPI"
            f"  {calls:>6} calls {affected:>8} rows  {query[:100]}"
        )
    return "\n".join(lines) + "\n"
