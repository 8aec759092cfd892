"""Queries of retention: delete finished executions, and closed dead letters, by age.

An execution is *finished* when it is ``completed``, ``cancelled``, or ``dead_lettered``
with no dead letter that still matters: every dead letter of its is purged, or was
replayed before the bound (a replay still on its way keeps it). Deleting an execution
deletes its steps and effect rows in the same statement (the workers write those rows
without a foreign key, to spare every event the checks), and its interventions and
approvals' decisions with them (``ON DELETE CASCADE``).
Nothing ``queued``, ``running``, ``retrying`` or ``waiting`` is ever deleted.

Each call deletes one bounded batch in the caller's transaction, oldest first, through the
``workflow_executions_finished`` index; rows another transaction holds (a retry locking
its execution) are skipped, not waited for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

BATCH = 1_000  # rows deleted per transaction

_OLDER = "now() - make_interval(secs => %(age)s)"
_FINISHED = (
    "e.status IN ('completed', 'dead_lettered', 'cancelled')"
    f" AND e.finished_at < {_OLDER}"
    " AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.execution_id = e.id"
    f" AND d.purged_at IS NULL AND (d.replayed_at IS NULL OR d.replayed_at >= {_OLDER}))"
)
_CLOSED_LETTER = f"coalesce(purged_at, replayed_at) < {_OLDER}"

# The rows of an execution that the workers write, keyed by ``execution_id``.
EXECUTION_ROWS = (
    "execution_steps",
    "approvals",
    "tasks",
    "assignments",
    "notifications",
    "status_changes",
)
_DELETE_EXECUTIONS = (
    "WITH doomed AS (SELECT e.id FROM workflow_executions e"
    f" WHERE {_FINISHED} ORDER BY e.finished_at LIMIT %(limit)s FOR UPDATE OF e SKIP LOCKED),"
    " gone AS (DELETE FROM workflow_executions e USING doomed WHERE e.id = doomed.id"
    " RETURNING e.id, e.status)"
    + "".join(
        f", {table}_gone AS (DELETE FROM {table} r USING gone WHERE r.execution_id = gone.id)"
        for table in EXECUTION_ROWS
    )
    + " SELECT status FROM gone"
)
_DELETE_LETTERS = (
    "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
    f" WHERE {_CLOSED_LETTER} ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
)


async def delete_executions(
    conn: AsyncConnection[Any], older_than_s: float, limit: int = BATCH
) -> Counter[str]:
    """Delete up to ``limit`` executions finished ``older_than_s`` ago; count them by status."""
    cur = await conn.execute(_DELETE_EXECUTIONS.encode(), {"age": older_than_s, "limit": limit})
    return Counter(str(row[0]) for row in await cur.fetchall())


async def delete_dead_letters(
    conn: AsyncConnection[Any], older_than_s: float, limit: int = BATCH
) -> int:
    """Delete up to ``limit`` dead letters replayed or purged ``older_than_s`` ago."""
    cur = await conn.execute(_DELETE_LETTERS.encode(), {"age": older_than_s, "limit": limit})
    return cur.rowcount


async def count(conn: AsyncConnection[Any], older_than_s: float) -> tuple[Counter[str], int]:
    """What the deletes would take now: executions by status, and dead letters."""
    params = {"age": older_than_s}
    cur = await conn.execute(
        f"SELECT e.status, count(*) FROM workflow_executions e WHERE {_FINISHED}"
        " GROUP BY e.status".encode(),
        params,
    )
    executions = Counter({str(status): int(n) for status, n in await cur.fetchall()})
    cur = await conn.execute(
        f"SELECT count(*) FROM dead_letters WHERE {_CLOSED_LETTER}".encode(), params
    )
    row = await cur.fetchone()
    return executions, int(row[0]) if row else 0


async def held_letters(
    conn: AsyncConnection[Any], entries: Sequence[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Which of the (stream, message id) pairs name a dead letter the table still holds."""
    if not entries:
        return set()
    streams, ids = zip(*entries, strict=True)
    cur = await conn.execute(
        "SELECT d.stream, d.message_id FROM dead_letters d"
        " JOIN unnest(%s::text[], %s::text[]) AS t(stream, message_id)"
        " ON d.stream = t.stream AND d.message_id = t.message_id",
        (list(streams), list(ids)),
    )
    return {(str(s), str(m)) for s, m in await cur.fetchall()}
