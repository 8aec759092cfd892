"""Queries on ``dead_letters``: what was dead-lettered, why, and what was replayed."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb


class NewDeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter about to be recorded."""

    stream: str
    message_id: str
    payload: dict[str, str]
    error: str
    attempts: int
    event_id: str | None = None
    event_type: str | None = None
    execution_id: str | None = None
    tenant: str | None = None  # with event_id, the event's identity


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``dead_letters``."""

    id: int
    stream: str
    message_id: str
    payload: dict[str, Any]
    error: str
    attempts: int
    event_id: str | None
    event_type: str | None
    execution_id: str | None
    created_at: datetime
    replayed_at: datetime | None
    replayed_by: str | None
    replay_reason: str | None
    replay_count: int
    purged_at: datetime | None
    purged_by: str | None


_COLUMNS = (
    "id, stream, message_id, payload, error, attempts, event_id, event_type,"
    " execution_id::text, created_at, replayed_at, replayed_by, replay_reason, replay_count,"
    " purged_at, purged_by"
)


async def record(conn: AsyncConnection[Any], letters: Sequence[NewDeadLetter]) -> None:
    """Insert dead letters; a letter already recorded for the same entry is kept as it was."""
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO dead_letters (stream, message_id, payload, error, attempts, event_id,"
            " event_type, execution_id, tenant) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (stream, message_id) DO NOTHING",
            [
                (
                    d.stream,
                    d.message_id,
                    Jsonb(d.payload),
                    d.error,
                    d.attempts,
                    d.event_id,
                    d.event_type,
                    d.execution_id,
                    d.tenant,
                )
                for d in letters
            ],
        )


async def list_open(
    conn: AsyncConnection[Any],
    selection: Selection | None = None,
    *,
    include_done: bool = False,
    limit: int = 1000,
) -> list[DeadLetter]:
    """Dead letters of ``selection``, newest first; only open ones unless ``include_done``."""
    where, params = (selection or Selection()).where(open_only=not include_done)
    query = (
        f"SELECT {_COLUMNS} FROM dead_letters WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %s"
    )
    async with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        await cur.execute(query.encode(), [*params, limit])
        return await cur.fetchall()


async def get(conn: AsyncConnection[Any], dead_letter_id: int) -> DeadLetter | None:
    """One dead letter by id."""
    async with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM dead_letters WHERE id = %s".encode(), (dead_letter_id,)
        )
        return await cur.fetchone()


async def count_open(conn: AsyncConnection[Any]) -> int:
    """How many dead letters wait for an operator."""
    cur = await conn.execute(
        "SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL AND purged_at IS NULL"
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    """Which open dead letters an operator means: some ids, or all; narrowed by filters."""

    ids: tuple[int, ...] = ()  # empty: every open dead letter that passes the filters
    reason: str | None = None  # a part of the error, in any case
    event_type: str | None = None
    older_than_s: float | None = None  # dead-lettered at least this long ago

    def where(self, *, open_only: bool = True) -> tuple[list[str], list[Any]]:
        """SQL conditions (joined with AND) and their parameters; open letters only unless
        ``open_only`` is false."""
        where = ["replayed_at IS NULL", "purged_at IS NULL"] if open_only else ["true"]
        params: list[Any] = []
        if self.ids:
            where.append("id = ANY(%s)")
            params.append(list(self.ids))
        if self.reason:
            # strpos, not ILIKE: a % or _ in the operator's text means itself.
            where.append("strpos(lower(error), lower(%s)) > 0")
            params.append(self.reason)
        if self.event_type:
            where.append("event_type = %s")
            params.append(self.event_type)
        if self.older_than_s is not None:
            where.append("created_at < now() - make_interval(secs => %s)")
            params.append(self.older_than_s)
        return where, params


async def claim_open(
    conn: AsyncConnection[Any], selection: Selection, *, after_id: int, upto_id: int
) -> DeadLetter | None:
    """Lock the next open dead letter of ``selection`` with ``after_id < id <= upto_id``.

    Run it inside a transaction: the row stays locked until the transaction ends, and
    another claim (``SKIP LOCKED``) passes over it meanwhile instead of waiting for it.
    """
    where, params = selection.where()
    query = (
        f"SELECT {_COLUMNS} FROM dead_letters WHERE {' AND '.join(where)} AND id > %s"
        " AND id <= %s ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
    )
    async with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        await cur.execute(query.encode(), [*params, after_id, upto_id])
        return await cur.fetchone()


async def mark_replayed(
    conn: AsyncConnection[Any], dead_letter_id: int, *, actor: str, reason: str | None
) -> None:
    """Record that ``actor`` put the dead letter back on its stream, and why."""
    await conn.execute(
        "UPDATE dead_letters SET replayed_at = now(), replayed_by = %s, replay_reason = %s,"
        " replay_count = replay_count + 1 WHERE id = %s",
        (actor, reason, dead_letter_id),
    )


async def select_open(
    conn: AsyncConnection[Any], selection: Selection, *, limit: int
) -> list[DeadLetter]:
    """The open dead letters of ``selection``, oldest first, without locking them."""
    where, params = selection.where()
    query = f"SELECT {_COLUMNS} FROM dead_letters WHERE {' AND '.join(where)} ORDER BY id LIMIT %s"
    async with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        await cur.execute(query.encode(), [*params, limit])
        return await cur.fetchall()


async def purge_open(conn: AsyncConnection[Any], selection: Selection, *, actor: str) -> list[int]:
    """Mark the open dead letters of ``selection`` purged by ``actor``; return their ids.

    A letter being replayed meanwhile is waited for, then left alone: it is no longer open.
    """
    where, params = selection.where()
    cur = await conn.execute(
        f"UPDATE dead_letters SET purged_at = now(), purged_by = %s WHERE {' AND '.join(where)}"
        " RETURNING id".encode(),
        [actor, *params],
    )
    return sorted(row[0] for row in await cur.fetchall())


async def newest_id(conn: AsyncConnection[Any]) -> int:
    """The highest dead-letter id so far (0 when there is none)."""
    cur = await conn.execute("SELECT coalesce(max(id), 0) FROM dead_letters")
    row = await cur.fetchone()
    return int(row[0]) if row else 0
