"""Dead letters: list them, show one, put them back on their stream, or purge them.

A replay adds the dead entry's original fields back to the stream it came from (the
``stream`` column), with ``attempt=1`` and ``replay_of=<dead letter id>``, and records
who replayed it and why. Each letter is claimed in its own transaction::

    SELECT ... FOR UPDATE SKIP LOCKED   (open letters only)  ->  XADD  ->  UPDATE  ->  COMMIT

so two replays (a second run, a second terminal, the HTTP API) never take the same
letter: one holds its lock and the other passes over it, then finds it replayed. A crash
between the XADD and the COMMIT leaves the letter open with its entry already added, and
a later replay adds it again; that is harmless, because the pipeline runs each (event,
workflow) once and skips each completed step, so the second copy changes nothing.

A command's letter moves its ``dead_lettered`` execution back to ``queued`` in the same
transaction, so Postgres, the record, says the work is unfinished until it runs; the
steps already completed are skipped
(govflow/consumers/actions.py). A dry run reads the same state to say what would run
(govflow/operations/replay_plan.py). The commands are in govflow/cli/dlq.py.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio
import msgspec
from psycopg_pool import AsyncConnectionPool
from redis.typing import EncodableT, FieldT

from govflow.consumers.seal import SEAL_FIELD, Seal
from govflow.consumers.streams import ATTEMPT_FIELD, REPLAY_FIELD, RedisClient, load_seal
from govflow.db import dead_letters, executions
from govflow.db.dead_letters import DeadLetter, Selection
from govflow.operations.replay_plan import ReplayPlan, plan
from govflow.schemas.keys import Keys

DRY_RUN_LIMIT = 1000  # letters a dry run describes at most
EVERY = Selection()  # every open dead letter


class Replayed(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter put back on its stream."""

    id: int
    stream: str
    message_id: str  # the entry that was dead-lettered
    entry_id: str  # the entry the replay added
    event_id: str | None
    event_type: str | None
    execution_id: str | None


class Skipped(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter asked for and left alone, and why."""

    id: int
    why: str


class ReplayReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``replay`` did, or with ``dry_run`` would do."""

    dry_run: bool
    actor: str
    reason: str | None
    replayed: list[Replayed] = []
    skipped: list[Skipped] = []
    plans: list[ReplayPlan] = []
    more: bool = False  # a dry run: more letters match than the DRY_RUN_LIMIT described


class PurgeReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``purge`` dropped."""

    actor: str
    purged: list[int]
    skipped: list[Skipped] = []


def default_actor() -> str:
    """The OS user, who replays or purges unless ``--actor`` says otherwise."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return "unknown"


async def list_letters(
    pool: AsyncConnectionPool[Any],
    selection: Selection = EVERY,
    *,
    include_done: bool = False,
    limit: int = 100,
) -> list[DeadLetter]:
    """Dead letters, newest first; open ones only unless ``include_done``."""
    async with pool.connection() as conn:
        return await dead_letters.list_open(conn, selection, include_done=include_done, limit=limit)


async def get_letter(pool: AsyncConnectionPool[Any], dead_letter_id: int) -> DeadLetter | None:
    """One dead letter, open or not."""
    async with pool.connection() as conn:
        return await dead_letters.get(conn, dead_letter_id)


async def replay(
    redis: RedisClient,
    pool: AsyncConnectionPool[Any],
    keys: Keys,
    selection: Selection,
    *,
    actor: str,
    reason: str | None = None,
    dry_run: bool = False,
    rate: float | None = None,
) -> ReplayReport:
    """Put the open dead letters of ``selection`` back on their streams, each once.

    Args:
        redis: the deployment's Redis.
        pool: the deployment's database.
        keys: the deployment's key names (to tell event streams from command streams).
        selection: ``ids``, or every open letter (empty ``ids``), narrowed by its filters.
        actor: who replays, recorded in ``replayed_by``.
        reason: why, recorded in ``replay_reason``.
        dry_run: replay nothing; describe what each letter would do now.
        rate: at most this many replays per second; ``None``: as fast as they go.
    """
    if dry_run:
        letters, skipped, more = await _dry_run_letters(pool, selection)
        plans = await plan(pool, keys, letters)
        return ReplayReport(
            dry_run=True, actor=actor, reason=reason, skipped=skipped, plans=plans, more=more
        )
    async with pool.connection() as conn:
        upto = await dead_letters.newest_id(conn)  # letters dead-lettered later wait for next time
    # Without the deployment's seal a replay runs as a plain delivery (``consumers.seal``).
    seal = await load_seal(redis, keys, create=False)
    replayed: list[Replayed] = []
    last, next_at = 0, anyio.current_time()
    while True:
        async with pool.connection() as conn, conn.transaction():
            letter = await dead_letters.claim_open(conn, selection, after_id=last, upto_id=upto)
            if letter is None:
                break
            if rate:  # paced here, once there is a letter, so the last one waits for none
                await anyio.sleep(max(0.0, next_at - anyio.current_time()))
                next_at = anyio.current_time() + 1 / rate
            if letter.execution_id is not None:
                # Postgres says it has work to do again: should Redis lose the entry added
                # below, the reconciler emits the command once the execution is overdue.
                await executions.queue_replayed(conn, letter.execution_id)
            # Between this XADD and the COMMIT a crash replays the letter twice: harmless,
            # see the module docstring.
            added = await redis.xadd(letter.stream, replay_fields(letter, seal))
            await dead_letters.mark_replayed(conn, letter.id, actor=actor, reason=reason)
        last = letter.id
        replayed.append(
            Replayed(
                id=letter.id,
                stream=letter.stream,
                message_id=letter.message_id,
                entry_id=added.decode() if isinstance(added, bytes) else str(added),
                event_id=letter.event_id,
                event_type=letter.event_type,
                execution_id=letter.execution_id,
            )
        )
    done = {r.id for r in replayed}
    skipped = await _explain(pool, [i for i in selection.ids if i not in done], selection)
    return ReplayReport(
        dry_run=False, actor=actor, reason=reason, replayed=replayed, skipped=skipped
    )


async def purge(pool: AsyncConnectionPool[Any], selection: Selection, *, actor: str) -> PurgeReport:
    """Mark the open dead letters of ``selection`` purged by ``actor``."""
    async with pool.connection() as conn, conn.transaction():
        purged = await dead_letters.purge_open(conn, selection, actor=actor)
    skipped = await _explain(pool, [i for i in selection.ids if i not in set(purged)], selection)
    return PurgeReport(actor=actor, purged=purged, skipped=skipped)


def replay_fields(letter: DeadLetter, seal: Seal | None = None) -> dict[FieldT, EncodableT]:
    """The entry a replay adds: the original fields, a first attempt, the letter's id;
    sealed with ``seal``, so that the workers honour the last two."""
    bookkeeping = (ATTEMPT_FIELD, REPLAY_FIELD, SEAL_FIELD)
    fields = {
        k.encode(): str(v).encode()
        for k, v in letter.payload.items()
        if k.encode() not in bookkeeping
    }
    fields[ATTEMPT_FIELD] = b"1"
    fields[REPLAY_FIELD] = str(letter.id).encode()
    signed = seal.sign(fields) if seal is not None else fields
    return {k.decode(): v.decode() for k, v in signed.items()}


async def _dry_run_letters(
    pool: AsyncConnectionPool[Any], selection: Selection
) -> tuple[list[DeadLetter], list[Skipped], bool]:
    """The letters a dry run describes, the ids it skips and why, and whether more match.

    Past the limit an id may match and simply not be described, so none is explained
    then: the report says that more match instead.
    """
    async with pool.connection() as conn:
        letters = await dead_letters.select_open(conn, selection, limit=DRY_RUN_LIMIT + 1)
    if len(letters) > DRY_RUN_LIMIT:
        return letters[:DRY_RUN_LIMIT], [], True
    found = {letter.id for letter in letters}
    missing = [i for i in selection.ids if i not in found]
    return letters, await _explain(pool, missing, selection), False


async def _explain(
    pool: AsyncConnectionPool[Any], ids: Sequence[int], selection: Selection
) -> list[Skipped]:
    """Say why each of ``ids`` was left alone."""
    skipped = []
    async with pool.connection() as conn:
        for i in ids:
            letter = await dead_letters.get(conn, i)
            skipped.append(Skipped(id=i, why=_why_not(letter, selection)))
    return skipped


def _why_not(letter: DeadLetter | None, selection: Selection) -> str:
    if letter is None:
        return "no such dead letter"
    if letter.purged_at is not None:
        return f"purged at {when(letter.purged_at)} by {letter.purged_by}"
    if letter.replayed_at is not None:
        return f"already replayed at {when(letter.replayed_at)} by {letter.replayed_by}"
    if selection.reason and selection.reason.lower() not in letter.error.lower():
        return f"its error does not contain {selection.reason!r}"
    if selection.event_type and selection.event_type != letter.event_type:
        return f"its event type is {letter.event_type}, not {selection.event_type}"
    if selection.older_than_s is not None:
        return f"it is not older than {selection.older_than_s:g}s"
    return "another replay or purge holds it right now"


def when(moment: datetime) -> str:
    """A moment as operators read it: ``2026-11-28 09:30:00 UTC``."""
    return f"{moment:%Y-%m-%d %H:%M:%S %Z}".strip()
