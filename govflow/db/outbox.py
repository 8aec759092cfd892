"""The transactional outbox: events written in the caller's own transaction."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from psycopg import AsyncConnection, Connection
from psycopg.types.json import Jsonb

from govflow.core import tracing
from govflow.schemas.codec import ENCODER
from govflow.schemas.events import Event

INSERT = "INSERT INTO outbox (event) VALUES (%s) RETURNING id"


def _jsonb(event: Event) -> Jsonb:
    # Dump with msgspec so the row holds exactly the wire format, with the current trace.
    (traced,) = tracing.stamped([event])
    return Jsonb(traced, dumps=ENCODER.encode)


async def enqueue(conn: AsyncConnection[Any], event: Event) -> int:
    """Add ``event`` to the outbox inside the caller's transaction; return the row id.

    With the ``otel`` extra this is a producer span, and an event without a trace context
    carries that span's, through the relay, to the workers.
    """
    with _enqueue_span(event):
        cur = await conn.execute(INSERT, (_jsonb(event),))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def enqueue_sync(conn: Connection[Any], event: Event) -> int:
    """``enqueue`` for a synchronous psycopg connection (Flask, Django)."""
    with _enqueue_span(event):
        cur = conn.execute(INSERT, (_jsonb(event),))
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def _enqueue_span(event: Event) -> AbstractContextManager[object]:
    return tracing.span(
        "publish outbox", kind="producer", attributes=tracing.event_attributes([event])
    )


BACKLOG = (
    "SELECT count(*),"
    " extract(epoch FROM clock_timestamp() - min(created_at))::float8"
    " FROM outbox WHERE published_at IS NULL"
)


async def backlog(conn: AsyncConnection[Any]) -> tuple[int, float | None]:
    """Count the rows waiting for the relay and measure how long the oldest has waited.

    ``created_at`` is the start of the inserting transaction, so a row from a long
    transaction looks older than its commit.

    Returns:
        ``(waiting, oldest_age_s)``: the age in seconds is ``None`` when nothing waits.
    """
    cur = await conn.execute(BACKLOG)
    row = await cur.fetchone()
    assert row is not None
    waiting, age = row
    return int(waiting), None if age is None else max(0.0, float(age))
