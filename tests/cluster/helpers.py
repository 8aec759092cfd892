"""Steps the cluster tests share: wait for a condition, query Postgres, run workers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
from psycopg_pool import AsyncConnectionPool

from consumers.streams import RedisClient
from db.workflows import apply_workflow
from ops.worker import Worker
from schemas.codec import decode_workflow
from schemas.keys import Keys
from schemas.settings import Settings

T = TypeVar("T")
GOVFLOW = Path(sys.executable).parent / "govflow"
ROLES = frozenset({"triggers", "actions"})


async def apply(pool: AsyncConnectionPool[Any], text: str) -> None:
    """Validate and store a workflow definition (YAML)."""
    async with pool.connection() as conn:
        await apply_workflow(conn, decode_workflow(text, "test"))


async def lease_owners(redis: RedisClient, keys: Keys, group: str) -> list[str | None]:
    """The value of each partition's lease key for ``group`` (None: free)."""
    pipe = redis.pipeline(transaction=False)
    for p in keys.all_partitions():
        pipe.get(keys.lease(group, p))
    values: list[bytes | None] = await pipe.execute()
    return [v.decode() if v is not None else None for v in values]


async def drained(redis: RedisClient, keys: Keys) -> bool:
    """Whether every partition's streams are delivered and acknowledged, and nothing waits."""
    for p in keys.all_partitions():
        for stream, group in ((keys.events(p), "triggers"), (keys.commands(p), "actions")):
            if not await redis.exists(stream):
                continue
            groups = {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}
            if group not in groups or groups[group]["pending"]:
                return False
            last: Any = await redis.xrevrange(stream, count=1)
            if last and last[0][0] != groups[group]["last-delivered-id"]:
                return False
        if await redis.zcard(keys.retry(p)) or await redis.hlen(keys.held("actions", p)):
            return False
        if await redis.hlen(keys.held("triggers", p)):
            return False
    return True


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, roles: frozenset[str] = ROLES
) -> AsyncIterator[Worker]:
    """Run a ``Worker`` in this test's event loop; stop it gracefully on the way out."""
    worker = Worker(settings, roles)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.stop()


def start_worker_process(
    settings: Settings, log: Path, roles: str = "triggers,actions"
) -> subprocess.Popen[bytes]:
    """Start ``govflow run --role ROLES`` configured like ``settings``, logging to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    assert settings.redis_url is not None
    assert settings.database_url is not None
    env.update(
        GOVFLOW_REDIS_URL=settings.redis_url,
        GOVFLOW_DATABASE_URL=settings.database_url,
        GOVFLOW_PREFIX=settings.prefix,
        GOVFLOW_PARTITIONS=str(settings.partitions),
        GOVFLOW_LEASE_TTL=str(settings.lease_ttl),
        GOVFLOW_CLAIM_IDLE=str(settings.claim_idle),
        GOVFLOW_BACKOFF_BASE=str(settings.backoff_base),
        GOVFLOW_MAX_ATTEMPTS=str(settings.max_attempts),
    )
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [str(GOVFLOW), "run", "--role", roles],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def pid_of(worker_id: str) -> int:
    """The process id inside a worker id (``host-pid-random``)."""
    return int(worker_id.rsplit("-", 2)[1])
