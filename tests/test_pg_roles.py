"""Least privilege on Postgres: deploy/postgres/roles.sql, and govflow running under it.

A Postgres of the test's own, with password authentication: the roles file is applied
as its README says (before and after ``govflow migrate``, which runs as the migrator),
then the workers run as ``govflow_worker``, a replay runs as ``govflow_operator``, and
each role is refused what it may not do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg
import pytest
from psycopg import errors as pg_errors

from govflow.db import prune
from govflow.db.outbox import enqueue_sync
from govflow.producers.publish import Publisher
from govflow.runtime.worker import Worker
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.faults.servers import PostgresServer, free_port, postgres_server, scratch_dir
from tests.fix_db import create_database, with_dbname

ROOT = Path(__file__).resolve().parent.parent
ROLES_SQL = (ROOT / "deploy" / "postgres" / "roles.sql").read_text()
GOVFLOW = Path(sys.executable).parent / "govflow"
ROLES = ("migrator", "worker", "operator", "reader", "producer")
SUPERUSER_PASSWORD = "superuser-pw"

WORKFLOWS = """
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - change_status: {to: under_review}
---
name: reviewed
entity: policy
trigger: status_change
when: [{field: status, equals: under_review}]
actions:
  - assign: {assignee: risk-team}
---
name: unreachable
entity: evidence
trigger: create
actions:
  - notify: {webhook: "http://127.0.0.1:CLOSED/hook"}
"""


class Roles(msgspec.Struct):
    server: PostgresServer
    database: str

    def url(self, role: str) -> str:
        return f"postgresql://govflow_{role}:{role}-pw@127.0.0.1:{self.server.port}/{self.database}"


def govflow(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    return subprocess.run(
        [str(GOVFLOW), *args], env={**base, **env}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def roles() -> Iterator[Roles]:
    """A migrated database whose tables belong to govflow_migrator, the roles granted."""
    with (
        scratch_dir("gf-roles-") as folder,
        postgres_server(folder / "pg", password=SUPERUSER_PASSWORD) as server,
    ):
        admin_url = with_dbname(server.url, "govflow")
        create_database(server.url, "govflow")
        found = Roles(server, "govflow")
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(ROLES_SQL.encode())
            for role in ROLES:
                admin.execute(f"ALTER ROLE govflow_{role} PASSWORD '{role}-pw'".encode())
        migrated = govflow("migrate", GOVFLOW_DATABASE_URL=found.url("migrator"))
        assert migrated.returncode == 0, migrated.stderr
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(ROLES_SQL.encode())  # again: the grants on the new tables
            admin.execute(ROLES_SQL.encode())  # and once more: it is idempotent
        yield found


def refused(roles: Roles, role: str, sql: str, params: tuple[Any, ...] = ()) -> bool:
    """Whether ``role`` is refused ``sql`` for want of privilege."""
    with psycopg.connect(roles.url(role), autocommit=True) as conn:
        try:
            conn.execute(sql.encode(), params)
        except pg_errors.InsufficientPrivilege:
            return True
    return False


def test_the_migrator_owns_every_table(roles: Roles) -> None:
    with psycopg.connect(roles.url("reader")) as conn:
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    assert owners == [("govflow_migrator",)]


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_workers_run_as_govflow_worker_and_a_replay_as_govflow_operator(
    roles: Roles, redis_server_url: str, prefix: str, tmp_path: Path
) -> None:
    files = []
    for number, document in enumerate(WORKFLOWS.split("---")):
        files.append(tmp_path / f"workflow-{number}.yaml")
        files[-1].write_text(document.replace("CLOSED", str(free_port())))
    applied = govflow(
        "workflows", "apply", *map(str, files), GOVFLOW_DATABASE_URL=roles.url("migrator")
    )
    assert applied.returncode == 0, applied.stderr
    # `govflow migrate` recorded the database for the prefix govflow; this test's deployment
    # has a prefix of its own, so that its Redis keys are its own too.
    with psycopg.connect(with_dbname(roles.server.url, roles.database), autocommit=True) as admin:
        admin.execute("UPDATE deployment SET prefix = %s", (prefix,))

    keys = Keys(prefix)
    events = [new_event("policy.created", f"POL-{i}", data={"title": str(i)}) for i in range(10)]
    events.append(new_event("evidence.created", "EV-1"))
    async with Publisher.from_url(redis_server_url, keys) as publisher:
        await publisher.publish_many(events)
    # A service that uses the outbox, as govflow_producer: the relay publishes its event.
    with psycopg.connect(roles.url("producer")) as conn:
        enqueue_sync(conn, new_event("policy.created", "POL-OUTBOX", data={"title": "o"}))

    settings = msgspec.convert(
        {
            "redis_url": redis_server_url,
            "database_url": roles.url("worker"),
            "prefix": prefix,
            "backoff_base": 0.05,
            "claim_idle": 2.0,
            "max_attempts": 2,
        },
        Settings,
    )
    worker = Worker(settings, frozenset({"triggers", "actions", "relay"}), concurrency=1)

    def statuses() -> dict[str, int]:
        with psycopg.connect(roles.url("reader")) as conn:
            rows = conn.execute(
                "SELECT status, count(*) FROM workflow_executions GROUP BY status"
            ).fetchall()
        return dict(rows)

    # 11 policies: review, then (its status change relayed) reviewed; 1 dead letter.
    wanted = {"completed": 22, "dead_lettered": 1}
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            await wait(lambda: statuses() == wanted, f"executions {wanted}", statuses)
        finally:
            worker.stop()

    with psycopg.connect(roles.url("reader")) as conn:
        assert conn.execute(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        ).fetchone() == (0,)
        ((letter,),) = conn.execute("SELECT id FROM dead_letters").fetchall()

    replay = govflow(
        "dlq", "replay", str(letter),
        GOVFLOW_DATABASE_URL=roles.url("operator"), GOVFLOW_REDIS_URL=redis_server_url,
        GOVFLOW_PREFIX=prefix,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    with psycopg.connect(roles.url("reader")) as conn:
        row = conn.execute("SELECT replayed_at IS NOT NULL FROM dead_letters").fetchone()
    assert row == (True,)


async def wait(done: Callable[[], bool], what: str, show: Callable[[], Any]) -> None:
    deadline = time.monotonic() + 90
    while not await anyio.to_thread.run_sync(done):
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {show()}"
        await anyio.sleep(0.2)


@pytest.mark.parametrize(
    ("role", "sql"),
    [
        ("worker", "DELETE FROM workflows"),
        ("worker", "UPDATE workflows SET enabled = false"),
        ("worker", "DELETE FROM approval_decisions"),
        ("worker", "TRUNCATE tasks"),
        ("worker", "CREATE TABLE intruder (id int)"),
        ("worker", "DROP TABLE tasks"),
        ("reader", "INSERT INTO outbox (event) VALUES ('{}')"),
        ("reader", "UPDATE workflow_executions SET status = 'completed'"),
        ("operator", "DELETE FROM dead_letters"),
        ("operator", "UPDATE dead_letters SET error = 'rewritten'"),
        ("operator", "UPDATE workflow_executions SET workflow_name = 'rewritten'"),
        ("operator", "DELETE FROM workflow_executions"),
        ("operator", "UPDATE approval_decisions SET decision = 'approve'"),
        ("producer", "SELECT * FROM outbox"),
        ("producer", "SELECT * FROM workflow_executions"),
        ("producer", "UPDATE outbox SET published_at = now()"),
        ("migrator", "CREATE ROLE intruder"),
    ],
)
def test_each_role_is_refused_what_it_may_not_do(roles: Roles, role: str, sql: str) -> None:
    assert refused(roles, role, sql)


def test_what_each_role_may_do(roles: Roles) -> None:
    assert not refused(roles, "reader", "SELECT count(*) FROM workflow_executions")
    assert not refused(roles, "operator", "UPDATE dead_letters SET purged_by = 'x' WHERE false")
    assert not refused(roles, "producer", "INSERT INTO outbox (event) SELECT '{}' WHERE false")
    assert not refused(roles, "worker", "SELECT count(*) FROM workflows")


def test_the_worker_may_prune_executions_with_their_rows(roles: Roles) -> None:
    """Retention deletes an execution's steps and effects itself: no cascade does it."""

    async def prune_as_worker() -> None:
        async with await psycopg.AsyncConnection.connect(roles.url("worker")) as conn:
            await prune.delete_executions(conn, older_than_s=0.0)

    anyio.run(prune_as_worker)
