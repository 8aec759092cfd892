"""The transactional outbox: events written in the caller's own transaction."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, Connection
from psycopg.types.json import Jsonb

from schemas.codec import ENCODER
from schemas.events import Event

INSERT = "INSERT INTO outbox (event) VALUES (%s) RETURNING id"


def _jsonb(event: Event) -> Jsonb:
    # Dump with msgspec so the row holds exactly the wire format.
    return Jsonb(event, dumps=ENCODER.encode)


async def enqueue(conn: AsyncConnection[Any], event: Event) -> int:
    """Add ``event`` to the outbox inside the caller's transaction; return the row id."""
    cur = await conn.execute(INSERT, (_jsonb(event),))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def enqueue_sync(conn: Connection[Any], event: Event) -> int:
    """``enqueue`` for a synchronous psycopg connection (Flask, Django)."""
    cur = conn.execute(INSERT, (_jsonb(event),))
    row = cur.fetchone()
    assert row is not None
    return int(row[0])
