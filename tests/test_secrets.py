"""No secret reaches a log line, an error message or a webhook: a grep over everything said.

govflow runs here with a password in each server URL, a webhook secret and API tokens,
at log level debug, through its error paths: Redis killed under the worker, Postgres
stopped under it, a webhook that cannot be reached, commands pointed at servers that are
not there or refuse the password, an API called with a good and a bad token. Every line
written to stdout or stderr, and every request the webhook receiver got, is then searched
for each secret.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.faults.receiver import receiving
from tests.faults.servers import (
    PostgresServer,
    RedisServer,
    free_port,
    postgres_server,
    redis_server,
    scratch_dir,
)
from tests.fix_db import create_database, with_dbname

GOVFLOW = Path(sys.executable).parent / "govflow"
REDIS_PASSWORD = "redis-Pa55-7f3c0e"
PG_PASSWORD = "pg-Pa55-91ab4d"
WRONG_PASSWORD = "wrong-Pa55-5e6f70"
WEBHOOK_SECRET = "whsec-0d5e8b2a"
API_TOKEN = "tok-4c1e9a77"
HOOK_PASSWORD = "hook-Pa55-2271"
SECRETS = (REDIS_PASSWORD, PG_PASSWORD, WRONG_PASSWORD, WEBHOOK_SECRET, API_TOKEN, HOOK_PASSWORD)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORKFLOW = """
name: leaky
entity: policy
trigger: create
actions:
  - notify: {webhook: "http://hook:HOOK_PASSWORD@127.0.0.1:HOOK_PORT/hook", message: "hi"}
  - notify: {webhook: "http://hook:HOOK_PASSWORD@127.0.0.1:CLOSED/nobody"}
"""


class Said:
    """Everything the processes of the test wrote, by what wrote it."""

    def __init__(self) -> None:
        self.outputs: dict[str, str] = {}

    def add(self, what: str, text: str) -> None:
        self.outputs[what] = self.outputs.get(what, "") + text

    def leaks(self) -> list[str]:
        return [
            f"{what} shows {secret!r}"
            for what, text in self.outputs.items()
            for secret in SECRETS
            if secret in text
        ]


@pytest.fixture
def servers() -> Iterator[tuple[RedisServer, PostgresServer]]:
    """A Redis and a Postgres of the test's own, each with a password."""
    with (
        scratch_dir("gf-secrets-") as folder,
        redis_server(folder / "redis", extra=["--requirepass", REDIS_PASSWORD]) as redis,
        postgres_server(folder / "pg", password=PG_PASSWORD) as pg,
    ):
        create_database(pg.url, "govflow")
        yield redis, pg


def govflow(
    said: Said, name: str, *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(GOVFLOW), "--log-level", "debug", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    said.add(name, result.stdout + result.stderr)
    return result


def test_no_password_token_or_secret_is_ever_written(
    servers: tuple[RedisServer, PostgresServer], tmp_path: Path
) -> None:
    redis, pg = servers
    redis_url = f"redis://default:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
    database_url = with_dbname(pg.url, "govflow")
    assert PG_PASSWORD in database_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    env.update(
        GOVFLOW_REDIS_URL=redis_url,
        GOVFLOW_DATABASE_URL=database_url,
        GOVFLOW_WEBHOOK_SECRET=WEBHOOK_SECRET,
        GOVFLOW_API_TOKENS=f"{API_TOKEN}:read,operate,publish",
        GOVFLOW_BACKOFF_BASE="0.05",
        GOVFLOW_MAX_ATTEMPTS="2",
        GOVFLOW_CLAIM_IDLE="2",
        GOVFLOW_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",  # the receiver listens on loopback
    )
    said = Said()
    with receiving() as hooks:
        definition = tmp_path / "leaky.yaml"
        definition.write_text(
            WORKFLOW.replace("HOOK_PASSWORD", HOOK_PASSWORD)
            .replace("HOOK_PORT", str(hooks.port))
            .replace("CLOSED", str(free_port()))
        )
        assert govflow(said, "migrate", "migrate", env=env).returncode == 0
        assert (
            govflow(said, "apply", "workflows", "apply", str(definition), env=env).returncode == 0
        )

        log = tmp_path / "worker.log"
        with log.open("wb") as stderr:
            worker = subprocess.Popen(
                [str(GOVFLOW), "--log-level", "debug", "run", "--role", "triggers,actions"],
                env=env, stdout=stderr, stderr=stderr,
            )  # fmt: skip
        try:
            published = govflow(
                said, "publish", "publish", "policy.created", "--entity-id", "P1", env=env
            )
            assert published.returncode == 0, published.stderr
            wait_for_log(log, b'"worker.started"', worker)
            # The error paths: Redis killed and back, Postgres away and back.
            redis.restart(down_for=1.0)
            pg.restart(down_for=1.0, mode="immediate")
            assert (
                govflow(
                    said, "publish after", "publish", "policy.created", "--entity-id", "P9", env=env
                ).returncode
                == 0
            )
            wait_settled(database_url, completed=0, dead=2, worker=worker, log=log)
            api(said, env, tmp_path)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        said.add("worker", log.read_text(errors="replace"))
        sent = [body for bodies in hooks.deliveries().values() for body in bodies]
        said.add("webhook bodies", b"\n".join(sent).decode(errors="replace"))
    # The webhook was called, signed with the secret, and never shown it.
    assert sent

    # Commands pointed at servers that are not there, or that refuse the password.
    closed = free_port()
    unreachable = {
        **env,
        "GOVFLOW_REDIS_URL": f"redis://default:{REDIS_PASSWORD}@127.0.0.1:{closed}/0",
        "GOVFLOW_DATABASE_URL": database_url.replace(PG_PASSWORD, WRONG_PASSWORD),
    }
    assert govflow(said, "publish, no Redis", "publish", "policy.created", "--entity-id", "X",
                   env=unreachable).returncode == 1  # fmt: skip
    assert govflow(said, "migrate, wrong password", "migrate", env=unreachable).returncode == 1
    assert govflow(
        said, "--redis-url", "--redis-url", f"redis://u:{WRONG_PASSWORD}@127.0.0.1:{closed}/0",
        "publish", "policy.created", "--entity-id", "X", env=env,
    ).returncode == 1  # fmt: skip
    assert govflow(said, "bad tokens", "workflows", "list",
                   env={**env, "GOVFLOW_API_TOKENS": f"{API_TOKEN}:everything"}).returncode == 2  # fmt: skip

    # What was captured is the real thing: the error paths were taken, and logged.
    worker_log = said.outputs["worker"]
    assert '"worker.started"' in worker_log
    assert '"level":"warning"' in worker_log  # a server went away under it
    assert "Redis" in said.outputs["publish, no Redis"]
    assert "password authentication failed" in said.outputs["migrate, wrong password"]
    assert said.leaks() == []


def api(said: Said, env: dict[str, str], tmp_path: Path) -> None:
    """Run ``govflow serve`` and call it with the token, and with a wrong one."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(GOVFLOW), "--log-level", "debug", "serve", "--port", str(port)],
            env=env, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, "govflow serve did not start"
                time.sleep(0.2)
        good = {"Authorization": f"Bearer {API_TOKEN}"}
        bad = {"Authorization": f"Bearer {API_TOKEN}x"}
        assert httpx.get(f"{base}/executions", headers=good, timeout=30).status_code == 200
        refused = httpx.get(f"{base}/executions", headers=bad, timeout=30)
        assert refused.status_code == 401
        said.add("API answers", refused.text)
        letters = httpx.get(f"{base}/dead-letters", headers=good, timeout=30).json()
        said.add("API answers", str(letters))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    said.add("serve", log.read_text(errors="replace"))


def wait_for_log(log: Path, needle: bytes, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while needle not in log.read_bytes():
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no {needle!r} in the log"
        time.sleep(0.1)


def wait_settled(
    database_url: str, *, completed: int, dead: int, worker: subprocess.Popen[bytes], log: Path
) -> None:
    """Wait until every execution ended: here each dead-lettered (its second webhook fails)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            with psycopg.connect(database_url, connect_timeout=5) as conn:
                rows: dict[str, int] = dict(
                    conn.execute(
                        "SELECT status, count(*) FROM workflow_executions GROUP BY status"
                    ).fetchall()
                )
        except psycopg.OperationalError:
            rows = {}
        wanted = {k: v for k, v in {"completed": completed, "dead_lettered": dead}.items() if v}
        if rows == wanted:
            return
        assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"executions {rows}, expected {wanted}"
        time.sleep(0.3)
