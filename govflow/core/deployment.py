"""What a deployment records about itself, and the checks a process makes at start-up.

Two settings must agree across every process of a deployment, and each is recorded where
the processes meet:

* The partition count, in Redis at ``{prefix}:meta`` (field ``partitions``). The first
  worker records its ``GOVFLOW_PARTITIONS``; later workers and every publisher compare
  theirs and refuse to run on a mismatch. A publisher left at 1 partition against an
  8-partition deployment would otherwise write to a stream that no worker reads.
* The prefix, in Postgres (table ``deployment``). ``govflow migrate`` records it; a worker,
  the API and the operator commands refuse a database recorded for another prefix. Dead
  letters, the outbox and the relay's lock are not scoped by prefix: two deployments need
  two databases.

A database nobody recorded (migrated by an older govflow, or by ``db.migrate`` alone, as
the tests do) and a Redis no worker has run on yet are accepted as they are.
"""

from __future__ import annotations

from typing import Any

import psycopg
import redis
import structlog
from psycopg_pool import AsyncConnectionPool
from redis import exceptions as redis_errors

from govflow.consumers.streams import RedisClient
from govflow.schemas.errors import DeploymentMismatchError
from govflow.schemas.keys import Keys

__all__ = [
    "DeploymentMismatchError",
    "check_partitions",
    "check_partitions_sync",
    "check_prefix",
    "check_prefix_at",
    "check_worker",
    "record_partitions",
    "record_prefix",
]

log = structlog.get_logger(__name__)

PARTITIONS_FIELD = "partitions"


async def record_partitions(client: RedisClient, keys: Keys) -> None:
    """Record the partition count unless one is; then check it (a worker, at start-up).

    Raises:
        DeploymentMismatchError: another partition count is recorded.
    """
    await client.hsetnx(keys.meta(), PARTITIONS_FIELD, keys.partitions)
    _compare(keys, await client.hget(keys.meta(), PARTITIONS_FIELD))


async def check_partitions(client: RedisClient, keys: Keys) -> None:
    """Check the partition count against the recorded one (a publisher, before writing).

    A client whose ACL may not read ``{prefix}:meta`` skips the check with a warning.

    Raises:
        DeploymentMismatchError: another partition count is recorded.
    """
    try:
        recorded = await client.hget(keys.meta(), PARTITIONS_FIELD)
    except redis_errors.NoPermissionError:
        _unchecked(keys)
        return
    _compare(keys, recorded)


def check_partitions_sync(client: redis.Redis | redis.RedisCluster, keys: Keys) -> None:
    """``check_partitions`` for a blocking client.

    Raises:
        DeploymentMismatchError: another partition count is recorded.
    """
    try:
        recorded = client.hget(keys.meta(), PARTITIONS_FIELD)
    except redis_errors.NoPermissionError:
        _unchecked(keys)
        return
    _compare(keys, recorded)


def _compare(keys: Keys, recorded: Any) -> None:
    if recorded is None or int(recorded) == keys.partitions:
        return
    raise DeploymentMismatchError(
        f"this deployment has {int(recorded)} partitions (recorded in Redis at "
        f"{keys.meta()}); GOVFLOW_PARTITIONS={keys.partitions} disagrees"
    )


def _unchecked(keys: Keys) -> None:
    log.warning(
        "deployment.partitions_unchecked",
        key=keys.meta(),
        hint=f"let this Redis user run HGET on {keys.meta()} (deploy/redis/users.acl)",
    )


async def record_prefix(conn: psycopg.AsyncConnection[Any], prefix: str) -> None:
    """Record ``prefix`` as the database's deployment unless one is (``govflow migrate``).

    Raises:
        DeploymentMismatchError: the database belongs to another prefix.
    """
    await conn.execute(
        "INSERT INTO deployment (prefix) VALUES (%s) ON CONFLICT DO NOTHING", (prefix,)
    )
    await check_prefix(conn, prefix)


async def check_prefix(conn: psycopg.AsyncConnection[Any], prefix: str) -> None:
    """Refuse a database that another deployment (another prefix) recorded.

    Raises:
        DeploymentMismatchError: the database belongs to another prefix.
    """
    cur = await conn.execute("SELECT to_regclass('deployment') IS NOT NULL")
    found = await cur.fetchone()
    if found is None or not found[0]:
        return  # migrated before the table existed: `govflow migrate` adds and records it
    cur = await conn.execute("SELECT prefix FROM deployment")
    row = await cur.fetchone()
    if row is not None and row[0] != prefix:
        raise DeploymentMismatchError(
            f"database {conn.info.dbname} belongs to deployment {row[0]!r}; "
            f"GOVFLOW_PREFIX={prefix} needs a database of its own"
        )


async def check_prefix_at(database_url: str, prefix: str) -> None:
    """``check_prefix`` on a connection of its own.

    Raises:
        DeploymentMismatchError: the database belongs to another prefix.
    """
    async with await psycopg.AsyncConnection.connect(
        database_url, autocommit=True, connect_timeout=10
    ) as conn:
        await check_prefix(conn, prefix)


async def check_worker(client: RedisClient, pool: AsyncConnectionPool[Any], keys: Keys) -> None:
    """A worker's start-up checks: record or compare the partitions, compare the prefix.

    Raises:
        DeploymentMismatchError: the deployment recorded another partition count or prefix.
    """
    await record_partitions(client, keys)
    async with pool.connection() as conn:
        await check_prefix(conn, keys.prefix)
