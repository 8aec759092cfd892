"""Where the embedded servers live, and how a one-shot command finds the running ones.

The data directory. ``GOVFLOW_DATA_DIR`` (or ``--data-dir``) wins when set. Otherwise
govflow looks for a ``.govflow`` folder in the current folder and then in each parent, as
git looks for ``.git``, and uses the first it finds; with none, it is ``.govflow`` in the
current folder, which only a command that starts the servers creates.

The running record. The process that runs the embedded servers (``govflow run``,
``govflow serve``) writes ``servers/<pid>.json`` in the data directory, with its pid and
the servers' URLs, and removes it when it stops. A one-shot command (``lag``, ``dlq``,
``executions``, ``publish``, ``workflows list``) reads the record of a live process and
uses those URLs; with none, it stops with ``NoServersError`` and never starts a server of
its own, which would be empty.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import structlog

from govflow.schemas.errors import UnavailableError

log = structlog.get_logger(__name__)

DATA_DIR_NAME = ".govflow"
RECORDS = "servers"


class Running(msgspec.Struct, frozen=True, kw_only=True):
    """A process that runs embedded servers, and their URLs (None: not embedded there)."""

    pid: int
    redis_url: str | None = None
    database_url: str | None = None
    started_at: float = 0.0


class NoServersError(UnavailableError):
    """No process runs embedded servers in the data directory."""

    def __init__(self, data_dir: Path, missing: str) -> None:
        super().__init__(
            f"no govflow is running with an embedded {missing} in {data_dir}: start one with "
            "`govflow run` (or `make run`) in that folder, point GOVFLOW_DATA_DIR at the "
            "data directory of one that runs, or set GOVFLOW_REDIS_URL and "
            "GOVFLOW_DATABASE_URL"
        )
        self.data_dir = data_dir


def find_data_dir(start: Path) -> Path | None:
    """The first ``.govflow`` folder in ``start`` or one of its parents, if any."""
    for folder in (start, *start.parents):
        candidate = folder / DATA_DIR_NAME
        if candidate.is_dir():
            return candidate
    return None


def default_data_dir(cwd: Path) -> Path:
    """The data directory when none is configured: found upwards, else ``cwd/.govflow``."""
    cwd = cwd.resolve()
    return find_data_dir(cwd) or cwd / DATA_DIR_NAME


@contextlib.contextmanager
def announced(data_dir: Path, *, redis_url: str | None, database_url: str | None) -> Iterator[None]:
    """Record this process's embedded servers in ``data_dir`` while the block runs."""
    folder = data_dir / RECORDS
    folder.mkdir(parents=True, exist_ok=True)
    record = Running(
        pid=os.getpid(), redis_url=redis_url, database_url=database_url, started_at=time.time()
    )
    path = folder / f"{record.pid}.json"
    # Written whole, then renamed: a reader never sees half a record.
    partial = path.with_suffix(".tmp")
    partial.write_bytes(msgspec.json.encode(record))
    partial.replace(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def find_running(data_dir: Path) -> list[Running]:
    """The records of live processes in ``data_dir``, newest first; stale ones are removed."""
    found: list[Running] = []
    for path in (data_dir / RECORDS).glob("*.json"):
        try:
            record = msgspec.json.decode(path.read_bytes(), type=Running)
        except (OSError, msgspec.DecodeError):
            continue  # removed meanwhile, or not ours
        if pid_alive(record.pid):
            found.append(record)
        else:
            path.unlink(missing_ok=True)  # a process that died without cleaning up
    return sorted(found, key=lambda r: r.started_at, reverse=True)


def running_urls(data_dir: Path, *, redis: bool, database: bool) -> dict[str, str]:
    """The URLs of the running embedded servers a command needs.

    Raises:
        NoServersError: no live process in ``data_dir`` runs one of them.
    """
    records = find_running(data_dir)
    urls: dict[str, str] = {}
    missing: list[str] = []
    wanted = [("redis_url", "Redis", redis), ("database_url", "Postgres", database)]
    for field, name, needed in wanted:
        url: str | None = next((getattr(r, field) for r in records if getattr(r, field)), None)
        if needed and url is None:
            missing.append(name)
        elif needed and url is not None:
            urls[field] = url
    if missing:
        raise NoServersError(data_dir, " and ".join(missing))
    return urls


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours
    return True
