"""Fencing tokens on executions: only the delivery that started last may write.

A worker starts a delivery with ``claim``, which bumps the execution's ``epoch`` and
returns it: that epoch is the delivery's token. Before its transaction writes any step,
effect or status, the worker calls ``hold`` with the tokens it was given: ``hold`` locks
the rows whose epoch is still the token, and names the others, whose delivery another
worker has started since. The lock lasts until the commit, so no newer ``claim`` can come
in between: every write of the transaction is made under the token that ``hold`` checked,
as if each were ``UPDATE ... WHERE id = ... AND epoch = ...``.

A worker frozen past ``GOVFLOW_CLAIM_IDLE`` (or past its partition lease) finds on waking
that the execution was claimed again: ``hold`` refuses it, the caller rolls its
transaction back and leaves the entry to the worker that owns it now.

A terminal execution (``completed``, ``dead_lettered``, ``cancelled``) is never claimed
again, so it never changes again; the one exception is a replayed dead letter, which
claims its ``dead_lettered`` execution anew (govflow/operations/dlq.py). A cancel bumps
the epoch too (govflow/db/interventions.py), so a delivery in flight when it lands writes
nothing more.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from psycopg import AsyncConnection

from govflow.db.batch import id_array

# Executions are locked, and then updated, one lookup by primary key per id, whatever the
# statistics say: on a table too fresh to have any (a backlog drained after a deploy),
# ``id = ANY(...)`` or a join on the ids was planned as a scan of every execution, once
# per batch. The LIMIT keeps each lateral subquery from being flattened into a join; the
# ids go in sorted, so rows are locked in id order and two transactions never wait on
# each other in a cycle.
LOCK = (
    "SELECT l.id FROM unnest(%s::uuid[]) AS i(id) CROSS JOIN LATERAL"
    " (SELECT id FROM workflow_executions WHERE id = i.id LIMIT 1 FOR NO KEY UPDATE) AS l"
)
# The rows of the ids given, by their physical address, for an UPDATE's WHERE. Only for
# rows this transaction has locked already: a row another transaction changes meanwhile
# would move, and the statement's snapshot would not see it at its new address.
ROWS_BY_ID = (
    "ctid = ANY(ARRAY(SELECT l.ctid FROM unnest(%s::uuid[]) AS i(id) CROSS JOIN LATERAL"
    " (SELECT ctid FROM workflow_executions WHERE id = i.id LIMIT 1) AS l))"
)

CLAIM = (
    "UPDATE workflow_executions e SET status = 'running', attempts = e.attempts + 1,"
    " epoch = e.epoch + 1, updated_at = now() WHERE " + ROWS_BY_ID +
    " AND (e.status NOT IN ('completed', 'dead_lettered', 'cancelled')"
    " OR (e.status = 'dead_lettered' AND e.id = ANY(%s::uuid[])))"
    " RETURNING e.id::text, e.epoch"
)  # fmt: skip
HOLD = (
    "SELECT e.id::text FROM unnest(%s::uuid[], %s::bigint[]) AS t(id, epoch)"
    " CROSS JOIN LATERAL (SELECT id FROM workflow_executions WHERE id = t.id"
    " AND epoch = t.epoch LIMIT 1 FOR NO KEY UPDATE) AS e"
)


class Fenced(Exception):  # noqa: N818 - a control-flow signal, not an error
    """A transaction held stale tokens: roll it back; ``ids`` are the executions refused."""

    def __init__(self, ids: Collection[str]) -> None:
        super().__init__(f"{len(ids)} execution(s) started by a newer delivery")
        self.ids = frozenset(ids)


async def claim(
    conn: AsyncConnection[Any], ids: Sequence[str], *, replays: Collection[str] = ()
) -> dict[str, int]:
    """Start a delivery of each execution: count it, show it running, bump its epoch.

    A terminal execution is left as it is, unless its id is in ``replays`` and it is
    ``dead_lettered``. Returns the new epoch of each execution claimed. The rows are
    locked in id order, as ``hold`` locks them, so a claim and a hold never deadlock.
    """
    if not ids:
        return {}
    ordered = id_array(sorted(ids))
    async with conn.pipeline():  # one round trip: the update waits on nothing but the lock
        await conn.execute(LOCK, (ordered,))
        cur = await conn.execute(CLAIM, (ordered, id_array(replays)))
        return {row[0]: int(row[1]) for row in await cur.fetchall()}


async def hold(conn: AsyncConnection[Any], tokens: Mapping[str, int]) -> set[str]:
    """Lock each execution whose epoch is still its token; return the ids refused.

    Run it in the transaction that writes for these deliveries, before its writes. The
    rows are locked in id order, so two transactions never wait on each other in a cycle.
    """
    if not tokens:
        return set()
    ids = sorted(tokens)
    epochs = "{" + ",".join(str(tokens[i]) for i in ids) + "}"
    cur = await conn.execute(HOLD, (id_array(ids), epochs))
    held = {row[0] for row in await cur.fetchall()}
    return set(ids) - held


async def check(conn: AsyncConnection[Any], tokens: Mapping[str, int]) -> None:
    """``hold`` the tokens, or raise ``Fenced`` naming the executions refused."""
    refused = await hold(conn, tokens)
    if refused:
        raise Fenced(refused)
