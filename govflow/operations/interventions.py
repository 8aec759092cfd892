"""Cancel and retry executions: what ``govflow executions cancel|retry`` and the API call.

**Cancel** stops an unfinished execution (``queued``, ``running``, ``retrying``,
``waiting``): in one transaction it locks the row, makes it ``cancelled`` (finished now),
bumps its fencing epoch and records who, when and why. The lock waits for a worker that
is writing for the execution to commit, and the epoch refuses the writes of a delivery
that started before (``db.fencing``): a cancel either comes after a step's commit or
before it, never half-way, and no step commits after it. A webhook in flight at that
moment may still be sent; its result is not recorded. The command still on a stream,
or coming back from the retry set, is acknowledged by the action workers without running
(govflow/consumers/actions.py).

**Retry** runs a ``dead_lettered`` or ``cancelled`` execution again from the step it
stopped at; completed steps are skipped, as a replay skips them.

- A ``dead_lettered`` execution's last dead letter is replayed (``operations.dlq``): the
  same path as ``govflow dlq replay``, recorded on the letter (``replayed_by``,
  ``replay_reason``) and here. Two retries at once replay it once.
- A ``cancelled`` one has no dead letter: in one transaction it is locked, made
  ``queued`` again, recorded, and its command, rebuilt from the event the trigger
  matcher kept, is added to its commands stream, as the reconciler puts lost work back
  (``consumers.reconcile``). A second retry finds it ``queued`` and is refused. A crash
  between the add and the commit leaves it ``cancelled``, and the workers acknowledge the
  command without running it.

Every refusal says why, per execution; nothing is refused half-way.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
from psycopg_pool import AsyncConnectionPool

from govflow.consumers.streams import COMMAND_FIELD, RedisClient
from govflow.db import interventions
from govflow.db.dead_letters import Selection
from govflow.db.fencing import TERMINAL
from govflow.db.interventions import Intervention, Kind, Locked
from govflow.operations import dlq
from govflow.schemas.codec import encode
from govflow.schemas.keys import Keys

RETRYABLE = frozenset({"dead_lettered", "cancelled"})
NO_SUCH = "no such execution"


class Refused(msgspec.Struct, frozen=True, kw_only=True):
    """An execution asked for and left alone, and why."""

    execution_id: str
    why: str


class InterventionReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a cancel or a retry did to each execution asked for."""

    kind: Kind
    actor: str
    reason: str | None
    done: list[Intervention] = []
    refused: list[Refused] = []


async def cancel(
    pool: AsyncConnectionPool[Any], ids: Sequence[str], *, actor: str, reason: str | None
) -> InterventionReport:
    """Cancel each unfinished execution of ``ids``, each in its own transaction."""
    done: list[Intervention] = []
    refused: list[Refused] = []
    for execution_id in ids:
        if not _is_uuid(execution_id):
            refused.append(Refused(execution_id=execution_id, why=NO_SUCH))
            continue
        async with pool.connection() as conn, conn.transaction():
            locked = await interventions.lock(conn, execution_id)
            why = _why_not_cancel(locked)
            if locked is None or why is not None:
                refused.append(Refused(execution_id=execution_id, why=why or NO_SUCH))
                continue
            await interventions.mark_cancelled(conn, execution_id)
            done.append(
                await interventions.record(
                    conn,
                    execution_id,
                    "cancel",
                    from_status=locked.status,
                    actor=actor,
                    reason=reason,
                )
            )
    return InterventionReport(kind="cancel", actor=actor, reason=reason, done=done, refused=refused)


async def retry(
    redis: RedisClient,
    pool: AsyncConnectionPool[Any],
    keys: Keys,
    ids: Sequence[str],
    *,
    actor: str,
    reason: str | None,
) -> InterventionReport:
    """Run each dead-lettered or cancelled execution of ``ids`` again, once."""
    retrier = _Retrier(redis, pool, keys, actor=actor, reason=reason)
    for execution_id in ids:
        await retrier.retry(execution_id)
    return InterventionReport(
        kind="retry", actor=actor, reason=reason, done=retrier.done, refused=retrier.refused
    )


class _Retrier:
    """Retries executions one at a time, collecting what was done and what was refused."""

    def __init__(
        self,
        redis: RedisClient,
        pool: AsyncConnectionPool[Any],
        keys: Keys,
        *,
        actor: str,
        reason: str | None,
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._actor = actor
        self._reason = reason
        self.done: list[Intervention] = []
        self.refused: list[Refused] = []

    async def retry(self, execution_id: str) -> None:
        if not _is_uuid(execution_id):
            self._refuse(execution_id, NO_SUCH)
            return
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT status FROM workflow_executions WHERE id = %s::uuid", (execution_id,)
            )
            row = await cur.fetchone()
        status = None if row is None else str(row[0])
        if status == "dead_lettered":
            await self._replay(execution_id)
        elif status == "cancelled":
            await self._requeue(execution_id)
        else:
            self._refuse(execution_id, _why_not_retry(status))

    async def _replay(self, execution_id: str) -> None:
        """Replay the execution's last dead letter, as ``govflow dlq replay`` does."""
        async with self._pool.connection() as conn:
            letter_id = await interventions.latest_dead_letter(conn, execution_id)
        if letter_id is None:
            self._refuse(execution_id, "dead-lettered, but no dead letter holds its command")
            return
        report = await dlq.replay(
            self._redis,
            self._pool,
            self._keys,
            Selection(ids=(letter_id,)),
            actor=self._actor,
            reason=self._reason,
        )
        if not report.replayed:
            why = report.skipped[0].why if report.skipped else "not replayed"
            self._refuse(execution_id, f"its dead letter {letter_id}: {why}")
            return
        async with self._pool.connection() as conn:
            self.done.append(
                await interventions.record(
                    conn,
                    execution_id,
                    "retry",
                    from_status="dead_lettered",
                    actor=self._actor,
                    reason=self._reason,
                    dead_letter_id=letter_id,
                )
            )

    async def _requeue(self, execution_id: str) -> None:
        """Queue a cancelled execution again and emit its command, in one transaction."""
        async with self._pool.connection() as conn, conn.transaction():
            locked = await interventions.lock(conn, execution_id)
            if locked is None or locked.status != "cancelled":
                self._refuse(
                    execution_id, _why_not_retry(None if locked is None else locked.status)
                )
                return
            command = locked.execution.command()
            if command is None:
                self._refuse(
                    execution_id, "its event is no longer kept, so its command cannot be rebuilt"
                )
                return
            await interventions.requeue(conn, execution_id)
            self.done.append(
                await interventions.record(
                    conn,
                    execution_id,
                    "retry",
                    from_status="cancelled",
                    actor=self._actor,
                    reason=self._reason,
                )
            )
            # Before the commit: a crash in between leaves it cancelled (module docstring).
            stream = self._keys.commands(self._keys.partition_of(locked.execution.entity_id))
            await self._redis.xadd(stream, {COMMAND_FIELD: encode(command)})

    def _refuse(self, execution_id: str, why: str) -> None:
        self.refused.append(Refused(execution_id=execution_id, why=why))


def _why_not_cancel(locked: Locked | None) -> str | None:
    if locked is None:
        return NO_SUCH
    if locked.status == "dead_lettered":
        return "already dead-lettered: retry it, or purge its dead letter"
    if locked.status in TERMINAL:
        return f"already {locked.status}"
    return None


def _why_not_retry(status: str | None) -> str:
    if status is None:
        return NO_SUCH
    if status == "completed":
        return "completed: nothing to retry"
    return f"{status}, not dead-lettered or cancelled: it is still running its course"


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
