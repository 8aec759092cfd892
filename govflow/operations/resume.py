"""Put executions back on the commands stream: those a decision or a deadline resumed.

The command is the one the trigger matcher emitted, rebuilt from the event Postgres kept
(``received_events``), so a resumed execution runs through the same machinery as any
other: claimed and fenced, retried, dead-lettered with a reason. Only executions that
are not finished are emitted. If Redis is out of reach, nothing is lost: the execution
is ``queued`` in Postgres, and the reconciler emits its command once it is overdue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.streams import COMMAND_FIELD, RedisClient
from govflow.db import reconcile
from govflow.schemas.codec import encode
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)


async def resume(
    redis: RedisClient, pool: AsyncConnectionPool[Any], keys: Keys, ids: Sequence[str]
) -> int:
    """Emit the command of each unfinished execution of ``ids``; return how many."""
    if not ids:
        return 0
    async with pool.connection() as conn:
        rows = await reconcile.with_events(conn, ids)
    pipe = redis.pipeline(transaction=False)
    emitted = 0
    for row in rows:
        command = row.command()
        if command is None:
            log.error("resume.event_unknown", execution_id=row.id, event_id=row.event_id)
            continue
        stream = keys.commands(keys.partition_of(row.entity_id))
        pipe.xadd(stream, {COMMAND_FIELD: encode(command)})
        emitted += 1
    if emitted:
        await pipe.execute()
    return emitted
