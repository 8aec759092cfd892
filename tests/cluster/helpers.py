"""Steps the cluster tests share: wait for a condition, query Postgres, run workers."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from govflow.consumers.streams import RedisClient
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.pipeline_helpers import GOVFLOW, worker_env


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


def start_worker_process(
    settings: Settings, log: Path, roles: str = "triggers,actions"
) -> subprocess.Popen[bytes]:
    """Start ``govflow run --role ROLES`` configured like ``settings``, logging to ``log``."""
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [str(GOVFLOW), "run", "--role", roles],
            env=worker_env(settings),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def pid_of(worker_id: str) -> int:
    """The process id inside a worker id (``host-pid-random``)."""
    return int(worker_id.rsplit("-", 2)[1])
