"""Least privilege on Redis: each role under its own ACL user (deploy/redis/users.acl), and TLS.

A Redis of the test's own loads the shipped ACL file verbatim (plus an administrator for
the test, who only sets the passwords). Each role does what it needs under its user, and
is refused what it may not do; then govflow reaches a Redis that speaks only TLS, with a
throwaway certificate, through ``rediss://``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg
import pytest
import structlog
from redis import Redis
from redis import exceptions as redis_errors

from govflow.db.workflows import apply_workflow
from govflow.producers.publish import SyncPublisher
from govflow.runtime.worker import Worker
from govflow.schemas.codec import decode_workflow
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.faults.servers import RedisServer, free_port, redis_server, scratch_dir
from tests.pipeline_helpers import running_worker

ROOT = Path(__file__).resolve().parent.parent
ACL_FILE = ROOT / "deploy" / "redis" / "users.acl"
GOVFLOW = Path(sys.executable).parent / "govflow"
PREFIX = "govflow"  # the prefix users.acl is written for
ADMIN = ("test-admin", "admin-pw")
PASSWORDS = {"producer": "producer-pw", "worker": "worker-pw", "operator": "operator-pw"}
KEYS = Keys(PREFIX)

WORKFLOWS = [
    """
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - assign: {assignee: risk-team}
""",
    # A webhook nobody answers: retried once, then dead-lettered (retry set, move, DLQ).
    """
name: unreachable
entity: evidence
trigger: create
actions:
  - notify: {webhook: "http://127.0.0.1:CLOSED/hook"}
""",
]


class AclRedis(msgspec.Struct):
    server: RedisServer

    def url(self, role: str) -> str:
        return f"redis://govflow-{role}:{PASSWORDS[role]}@127.0.0.1:{self.server.port}/0"

    def client(self, role: str) -> Redis:
        return Redis.from_url(self.url(role), socket_timeout=10)


@pytest.fixture
def acl_redis() -> Iterator[AclRedis]:
    """A Redis that loads users.acl; the roles' passwords are set by an administrator."""
    with scratch_dir("gf-acl-") as folder:
        acl = folder / "users.acl"
        shutil.copyfile(ACL_FILE, acl)
        with acl.open("a") as f:
            f.write(f"user {ADMIN[0]} on >{ADMIN[1]} ~* &* +@all\n")
        with redis_server(folder / "redis", extra=["--aclfile", str(acl)]) as server:
            admin = Redis(port=server.port, username=ADMIN[0], password=ADMIN[1])
            for role, password in PASSWORDS.items():
                admin.execute_command(  # type: ignore[no-untyped-call]
                    "ACL", "SETUSER", f"govflow-{role}", f">{password}"
                )
            admin.close()
            yield AclRedis(server)


def refused(call: Callable[[], Any]) -> bool:
    """Whether Redis refuses ``call`` for want of permission."""
    try:
        call()
    except redis_errors.NoPermissionError:
        return True
    return False


def test_the_producer_publishes_and_may_do_nothing_else(acl_redis: AclRedis) -> None:
    with SyncPublisher.from_url(acl_redis.url("producer"), KEYS) as publisher:
        publisher.publish(new_event("policy.created", "POL-1"))
    admin = Redis(port=acl_redis.server.port, username=ADMIN[0], password=ADMIN[1])
    assert admin.xlen(KEYS.events()) == 1
    admin.close()

    r = acl_redis.client("producer")
    try:
        assert refused(lambda: r.xreadgroup("triggers", "me", {KEYS.events(): ">"}))
        assert refused(lambda: r.xrange(KEYS.events()))
        assert refused(r.flushall)
        assert refused(lambda: r.xadd(KEYS.dead(), {"forged": "letter"}))
        assert refused(lambda: r.xadd(KEYS.commands(), {"command": "{}"}))
        assert refused(lambda: r.xadd("elsewhere:events", {"event": "{}"}))
        assert refused(lambda: r.keys("*"))
        assert refused(lambda: r.config_get("*"))
    finally:
        r.close()


@asynccontextmanager
async def worker_as(url: str, database_url: str) -> AsyncIterator[Worker]:
    settings = msgspec.convert(
        {
            "redis_url": url,
            "database_url": database_url,
            "prefix": PREFIX,
            "backoff_base": 0.05,
            "claim_idle": 2.0,
            "max_attempts": 2,
            "webhook_timeout": 2.0,
            "webhook_allowed_hosts": "127.0.0.1",  # the unanswered webhook is on loopback
        },
        Settings,
    )
    async with running_worker(settings, concurrency=1) as worker:
        yield worker


async def wait_for(probe: Callable[[], Any], what: str, within: float = 60.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await anyio.sleep(0.1)


async def store_workflows(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for text in WORKFLOWS:
            text = text.replace("CLOSED", str(free_port()))
            await apply_workflow(conn, decode_workflow(text, "test"))


def govflow(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    return subprocess.run(
        [str(GOVFLOW), *args],
        env={**base, "GOVFLOW_PREFIX": PREFIX, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_worker_runs_the_pipeline_and_the_operator_reads_and_replays(
    acl_redis: AclRedis, database_url: str
) -> None:
    await store_workflows(database_url)
    events = [new_event("policy.created", f"POL-{i}", data={"title": str(i)}) for i in range(20)]
    events.append(new_event("evidence.created", "EV-1"))
    with SyncPublisher.from_url(acl_redis.url("producer"), KEYS) as publisher:
        publisher.publish_many(events)

    async def settled() -> bool:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
            cur = await db.execute(
                "SELECT status, count(*) FROM workflow_executions GROUP BY status"
            )
            statuses: dict[str, int] = dict(await cur.fetchall())
        admin = Redis(port=acl_redis.server.port, username=ADMIN[0], password=ADMIN[1])
        try:
            try:
                pending = sum(
                    admin.xpending(stream, group)["pending"]
                    for stream, group in ((KEYS.events(), "triggers"), (KEYS.commands(), "actions"))
                )
            except redis_errors.ResponseError as e:
                # The worker says it started before each consumer has made its group.
                if "NOGROUP" in str(e):
                    return False
                raise
            drained = pending == 0 and admin.zcard(KEYS.retry()) == 0
            return drained and statuses == {"completed": 20, "dead_lettered": 1}
        finally:
            admin.close()

    with structlog.testing.capture_logs() as logs:
        async with worker_as(acl_redis.url("worker"), database_url) as worker:
            await wait_for(settled, "20 executions completed and 1 dead-lettered")
            # The liveness probe runs in the worker's pod, with the worker's user.
            probe = await anyio.to_thread.run_sync(
                lambda: govflow("check", GOVFLOW_REDIS_URL=acl_redis.url("worker"))
            )
            assert probe.returncode == 0, probe.stderr
            assert f"worker {worker.id} is live" in probe.stdout
    # Not one command any script or loop sent was refused on the way.
    refusals = [entry for entry in logs if "NOPERM" in json.dumps(entry, default=str)]
    assert refusals == []

    # The operator: `govflow lag` reads every group; a replay puts the letter back.
    env = {"GOVFLOW_REDIS_URL": acl_redis.url("operator"), "GOVFLOW_DATABASE_URL": database_url}
    lag = govflow("lag", "--json", **env)
    assert lag.returncode == 0, lag.stderr
    shown = json.loads(lag.stdout)
    assert {(g["stream"], g["group"]) for g in shown["groups"]} >= {
        (KEYS.events(), "triggers"),
        (KEYS.commands(), "actions"),
    }
    assert shown["dead_letters"] == 1
    assert [(w["id"], w["state"]) for w in shown["workers"]] == [(worker.id, "stopped")]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
        cur = await db.execute("SELECT id FROM dead_letters")
        ((letter,),) = await cur.fetchall()
    commands_before = acl_redis.client("operator").xlen(KEYS.commands())
    replay = govflow("dlq", "replay", str(letter), **env)
    assert replay.returncode == 0, replay.stderr
    assert acl_redis.client("operator").xlen(KEYS.commands()) == commands_before + 1


def test_the_worker_and_the_operator_are_refused_what_they_may_not_do(
    acl_redis: AclRedis,
) -> None:
    worker, operator = acl_redis.client("worker"), acl_redis.client("operator")
    worker.xgroup_create(KEYS.events(), "triggers", id="0", mkstream=True)
    entry = worker.xadd(KEYS.events(), {"event": "{}"})
    try:
        # The worker: its keys only, and no administration.
        assert refused(worker.flushall)
        assert refused(lambda: worker.xgroup_destroy(KEYS.events(), "triggers"))
        assert refused(lambda: worker.set("elsewhere:key", "x"))
        assert refused(lambda: worker.keys("*"))
        assert refused(lambda: worker.config_set("appendonly", "no"))
        assert refused(lambda: worker.acl_list())
        assert refused(lambda: worker.delete("elsewhere:key"))
        # The operator: reads, and replays; never acknowledges, deletes or trims.
        assert operator.xlen(KEYS.events()) == 1
        assert refused(lambda: operator.xack(KEYS.events(), "triggers", entry))
        assert refused(lambda: operator.delete(KEYS.events()))
        assert refused(lambda: operator.xdel(KEYS.events(), entry))
        assert refused(lambda: operator.xtrim(KEYS.events(), maxlen=0))
        assert refused(lambda: operator.xadd(KEYS.dead(), {"forged": "letter"}))
        assert refused(lambda: operator.xreadgroup("triggers", "op", {KEYS.events(): ">"}))
        assert refused(operator.flushall)
    finally:
        worker.close()
        operator.close()


# ---------------------------------------------------------------- TLS


@pytest.fixture
def tls_redis() -> Iterator[tuple[RedisServer, Path]]:
    """A Redis that speaks only TLS, with a certificate from a throwaway CA; and the CA."""
    with scratch_dir("gf-tls-") as folder:
        ca, key, cert = folder / "ca.crt", folder / "server.key", folder / "server.crt"
        ext = folder / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for args in (
            ["req", "-x509", *ec, "-keyout", str(folder / "ca.key"), "-out", str(ca),
             "-days", "1", "-subj", "/CN=govflow test CA"],
            ["req", *ec, "-keyout", str(key), "-out", str(folder / "server.csr"),
             "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", str(folder / "server.csr"), "-CA", str(ca),
             "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-out", str(cert),
             "-days", "1", "-extfile", str(ext)],
        ):  # fmt: skip
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
        key.chmod(0o600)
        extra = [
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
        ]  # fmt: skip
        with redis_server(folder / "redis", extra=extra, tls=True) as server:
            yield server, ca


@pytest.mark.anyio
@pytest.mark.slow
async def test_publish_and_a_worker_over_tls(
    tls_redis: tuple[RedisServer, Path], database_url: str
) -> None:
    server, ca = tls_redis
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    await store_workflows(database_url)

    published = govflow(
        "publish", "policy.created", "--entity-id", "POL-TLS", GOVFLOW_REDIS_URL=url
    )
    assert published.returncode == 0, published.stderr
    event_id = published.stdout.strip()

    async def completed() -> bool:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
            cur = await db.execute(
                "SELECT status FROM workflow_executions WHERE event_id = %s", (event_id,)
            )
            return await cur.fetchall() == [("completed",)]

    async with worker_as(url, database_url):
        await wait_for(completed, "the event published over TLS to run")

    # The certificate is checked: without the CA it is refused, and plain text goes nowhere.
    untrusted = f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required"
    plain = f"redis://127.0.0.1:{server.port}/0"
    for bad in (untrusted, plain):
        result = govflow("publish", "policy.created", "--entity-id", "P", GOVFLOW_REDIS_URL=bad)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
