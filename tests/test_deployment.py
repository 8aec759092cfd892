"""One deployment per prefix: its partition count recorded in Redis, its database its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from govflow.core import deployment
from govflow.core.deployment import DeploymentMismatchError
from govflow.producers.publish import Publisher, SyncPublisher
from govflow.runtime.worker import Worker
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.pipeline_helpers import running_worker
from tests.test_cli import ROOT, Run, assert_one_error_line, clean_env

pytestmark = pytest.mark.anyio


@pytest.fixture(name="govflow")
def govflow_fixture(redis_server_url: str, database_url: str, prefix: str) -> Run:
    """Run ``govflow ARGS...`` with this test's servers and prefix."""
    servers = {
        "GOVFLOW_REDIS_URL": redis_server_url,
        "GOVFLOW_DATABASE_URL": database_url,
        "GOVFLOW_PREFIX": prefix,
    }

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "govflow.cli", *args],
            env={**clean_env(), **servers, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


def mismatch(recorded: int, configured: int, prefix: str) -> str:
    return (
        f"this deployment has {recorded} partitions (recorded in Redis at {prefix}:meta); "
        f"GOVFLOW_PARTITIONS={configured} disagrees"
    )


class TestPartitions:
    async def test_the_first_worker_records_them_and_a_later_one_must_agree(
        self, make_settings: Callable[..., Settings], redis: Redis, prefix: str
    ) -> None:
        async with running_worker(make_settings(partitions=3), concurrency=1):
            assert await redis.hget(f"{prefix}:meta", "partitions") == b"3"

        worker = Worker(make_settings(partitions=1), frozenset({"triggers"}))
        with pytest.raises(DeploymentMismatchError) as caught:
            with anyio.fail_after(30):
                await worker.run()
        assert str(caught.value) == mismatch(3, 1, prefix)

    async def test_a_publisher_that_disagrees_writes_nothing(
        self, redis: Redis, redis_server_url: str, prefix: str
    ) -> None:
        await deployment.record_partitions(redis, Keys(prefix, partitions=8))

        with pytest.raises(DeploymentMismatchError, match="has 8 partitions"):
            await Publisher.connect(redis_server_url, Keys(prefix))
        async with Publisher.from_url(redis_server_url, Keys(prefix)) as lazy:
            with pytest.raises(DeploymentMismatchError, match="GOVFLOW_PARTITIONS=1 disagrees"):
                await lazy.publish(new_event("policy.created", "P1"))
        with (
            SyncPublisher.from_url(redis_server_url, Keys(prefix, partitions=2)) as sync,
            pytest.raises(DeploymentMismatchError, match="GOVFLOW_PARTITIONS=2 disagrees"),
        ):
            sync.publish(new_event("policy.created", "P1"))
        assert await redis.exists(f"{prefix}:events") == 0

        async with await Publisher.connect(redis_server_url, Keys(prefix, 8)) as agreeing:
            await agreeing.publish(new_event("policy.created", "P1"))
        with SyncPublisher.from_url(redis_server_url, Keys(prefix, partitions=8)) as sync:
            sync.publish(new_event("policy.created", "P2"))

    async def test_nothing_recorded_is_nothing_to_disagree_with(
        self, redis: Redis, redis_server_url: str, prefix: str
    ) -> None:
        async with await Publisher.connect(redis_server_url, Keys(prefix, 4)) as publisher:
            await publisher.publish(new_event("policy.created", "P1"))
        assert await redis.exists(f"{prefix}:meta") == 0  # only a worker records

    def test_govflow_publish_refuses_in_one_line(
        self, govflow: Run, redis_server_url: str, prefix: str
    ) -> None:
        client = SyncRedis.from_url(redis_server_url)
        client.hset(f"{prefix}:meta", "partitions", "8")
        client.close()
        result = govflow("publish", "policy.created", "--entity-id", "P1")
        line = assert_one_error_line(result, 2)
        assert line == f"govflow: {mismatch(8, 1, prefix)}"
        ok = govflow("publish", "policy.created", "--entity-id", "P1", GOVFLOW_PARTITIONS="8")
        assert ok.returncode == 0, ok.stderr


class TestOneDatabasePerPrefix:
    def test_migrate_records_the_prefix_and_other_prefixes_are_refused(
        self, govflow: Run, empty_database_url: str, prefix: str
    ) -> None:
        first = govflow("migrate", GOVFLOW_DATABASE_URL=empty_database_url)
        assert first.returncode == 0, first.stderr
        with psycopg.connect(empty_database_url) as conn:
            assert conn.execute("SELECT prefix FROM deployment").fetchall() == [(prefix,)]
            dbname = conn.info.dbname

        expected = (
            f"govflow: database {dbname} belongs to deployment {prefix!r}; "
            "GOVFLOW_PREFIX=other needs a database of its own"
        )
        for command in (["migrate"], ["dlq", "list"], ["executions", "list"], ["lag"]):
            result = govflow(
                *command, GOVFLOW_DATABASE_URL=empty_database_url, GOVFLOW_PREFIX="other"
            )
            assert assert_one_error_line(result, 2) == expected, command
        again = govflow("migrate", GOVFLOW_DATABASE_URL=empty_database_url)
        assert again.returncode == 0, again.stderr

    async def test_a_worker_refuses_another_deployments_database(
        self, make_settings: Callable[..., Settings], database_url: str
    ) -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await deployment.record_prefix(conn, "govflow")
        worker = Worker(make_settings(), frozenset({"actions"}))
        with pytest.raises(DeploymentMismatchError, match="belongs to deployment 'govflow'"):
            with anyio.fail_after(30):
                await worker.run()

    async def test_a_database_nobody_recorded_is_accepted(
        self, make_settings: Callable[..., Settings], pool: Any
    ) -> None:
        # The tests' databases are migrated without a prefix: each test's prefix may use one.
        async with running_worker(make_settings(), concurrency=1):
            pass
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM deployment")
            assert await cur.fetchone() == (0,)


def test_the_relay_needs_a_direct_session_says_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "PgBouncer" in readme


def test_serve_refuses_another_deployments_database(govflow: Run, database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO deployment (prefix) VALUES ('govflow')")
    line = assert_one_error_line(govflow("serve", "--port", "0"), 2)
    assert line.endswith("belongs to deployment 'govflow'; GOVFLOW_PREFIX=" + line.split("=")[-1])
    assert "needs a database of its own" in line
