"""Fencing tokens on executions: only the delivery that started last may write.

A worker starts a delivery by locking its executions with ``lock``, which returns each
one's ``epoch`` (or names it busy, held by another transaction: that delivery comes back
later, ``consumers.actions``); the delivery's token is that epoch plus one, and the
delivery counts itself and writes the token in one of two ways:

- ``claim``, in the transaction that locked, shows the execution ``running``, counts the
  attempt and bumps the epoch to the token, before the worker commits and calls the
  outside world;
- or, when the whole delivery runs in the transaction that locked (nothing to perform
  outside), its one final write of the execution's status does the same (``STARTED``):
  one new row version instead of two, so a backlog leaves half the dead rows behind.

Before its transaction writes any step, effect or status, the worker calls ``hold`` with
the epochs the rows have now (its token after ``claim``, the locked epoch otherwise):
``hold`` locks the rows whose epoch is still that, and names the others, whose delivery
another worker has started since. The lock lasts until the commit, so no newer delivery
can start in between: every write of the transaction is made under the epoch that
``hold`` checked, as if each were ``UPDATE ... WHERE id = ... AND epoch = ...``.

A worker frozen past ``GOVFLOW_CLAIM_IDLE`` (or past its partition lease) finds on waking
that the execution was claimed again: ``hold`` refuses it, the caller rolls its
transaction back and leaves the entry to the worker that owns it now.

A terminal execution (``completed``, ``dead_lettered``, ``cancelled``) is never started
again, so it never changes again; the one exception is a replayed dead letter, which
starts its ``dead_lettered`` execution anew (govflow/operations/dlq.py). A cancel bumps
the epoch too (govflow/db/interventions.py), so a delivery in flight when it lands writes
nothing more.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import anyio
from psycopg import AsyncConnection

from govflow.db.batch import id_array

# Executions are locked, and then updated, one lookup by primary key per id, whatever the
# statistics say: on a table too fresh to have any (a backlog drained after a deploy),
# ``id = ANY(...)`` or a join on the ids was planned as a scan of every execution, once
# per batch. The LIMIT keeps each lateral subquery from being flattened into a join; the
# ids go in sorted, so rows are locked in id order. A row another transaction holds is
# passed over (``SKIP LOCKED``) and named busy (the last column): waiting for it would
# wait as long as its holder, and a worker frozen mid-transaction (a long GC pause, a
# suspended VM) holds its rows until it wakes.
LOCK = (
    "SELECT i.id::text, l.epoch, l.status,"
    " CASE WHEN l.status IS NULL THEN EXISTS"
    " (SELECT FROM workflow_executions WHERE id = i.id) ELSE false END"
    " FROM unnest(%s::uuid[]) AS i(id) LEFT JOIN LATERAL"
    " (SELECT epoch, status FROM workflow_executions WHERE id = i.id LIMIT 1"
    " FOR NO KEY UPDATE SKIP LOCKED) AS l ON true"
)
# How long ``lock`` keeps trying for rows another transaction holds, and how often. Every
# transaction that writes an execution is short (a batch's start or record, a decision, a
# cancel): one still open after this long belongs to a process that is frozen or stuck.
BUSY_PATIENCE_S = 1.0
BUSY_POLL_S = 0.05
# The rows of the ids given, by their physical address, for an UPDATE's WHERE. Only for
# rows this transaction has locked already: a row another transaction changes meanwhile
# would move, and the statement's snapshot would not see it at its new address.
ROWS_BY_ID = (
    "ctid = ANY(ARRAY(SELECT l.ctid FROM unnest(%s::uuid[]) AS i(id) CROSS JOIN LATERAL"
    " (SELECT ctid FROM workflow_executions WHERE id = i.id LIMIT 1) AS l))"
)
# What a delivery's start writes, in ``claim`` or in the final write of a delivery that
# runs whole in the transaction that locked its executions.
STARTED = "attempts = attempts + 1, epoch = epoch + 1"

CLAIM = (
    "UPDATE workflow_executions SET status = 'running', " + STARTED + ", updated_at = now()"
    " WHERE " + ROWS_BY_ID
)
HOLD = (
    "SELECT e.id::text FROM unnest(%s::uuid[], %s::bigint[]) AS t(id, epoch)"
    " CROSS JOIN LATERAL (SELECT id FROM workflow_executions WHERE id = t.id"
    " AND epoch = t.epoch LIMIT 1 FOR NO KEY UPDATE) AS e"
)
# An execution that no delivery starts again (a replayed dead letter aside), and that
# therefore never changes again, except through a replay or a retry
# (govflow/operations/interventions.py).
TERMINAL: frozenset[str] = frozenset({"completed", "dead_lettered", "cancelled"})


def started_items(started: bool) -> str:
    """The ``SET`` items a final write adds when its delivery started in its transaction
    (``lock`` without ``claim``): ``STARTED``, after a comma; nothing otherwise."""
    return ", " + STARTED if started else ""


class Locked(NamedTuple):
    """What ``lock`` took: the epoch of each execution locked, and the ones held elsewhere."""

    epochs: dict[str, int]
    busy: frozenset[str]


async def lock(
    conn: AsyncConnection[Any],
    ids: Sequence[str],
    *,
    replays: Collection[str] = (),
    patience: float = BUSY_PATIENCE_S,
) -> Locked:
    """Lock the executions a delivery may start; return the epoch each has now.

    A terminal execution is locked but left out, unless its id is in ``replays`` and it
    is ``dead_lettered``. A row another transaction holds is tried again every
    ``BUSY_POLL_S`` for ``patience`` seconds, then named ``busy``: its delivery should
    wait and come back, not hold this batch. The delivery is started only once
    ``claim``, or its final write (``STARTED``), bumps the epoch in this transaction.
    """
    epochs: dict[str, int] = {}
    wanted = sorted(ids)
    deadline = anyio.current_time() + patience
    while wanted:
        cur = await conn.execute(LOCK, (id_array(wanted),))
        wanted = []
        for id_, epoch, status, busy in await cur.fetchall():
            if busy:
                wanted.append(id_)
            elif status is not None and (
                status not in TERMINAL or (status == "dead_lettered" and id_ in replays)
            ):
                epochs[id_] = int(epoch)
        if not wanted or anyio.current_time() >= deadline:
            break
        await anyio.sleep(BUSY_POLL_S)
    return Locked(epochs, frozenset(wanted))


async def claim(conn: AsyncConnection[Any], locked: Mapping[str, int]) -> dict[str, int]:
    """Start a delivery of each execution ``lock`` returned (id: epoch): count it, show it
    running and bump its epoch; return each delivery's token, the locked epoch plus one."""
    if locked:
        await conn.execute(CLAIM, (id_array(sorted(locked)),))
    return {id_: epoch + 1 for id_, epoch in locked.items()}


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
