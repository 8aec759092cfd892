"""Find an execution, an approval or a task by the start of its id, as listings show it:
``3f2a1b7c``.

Their ids are UUIDs; a prefix of the hex digits (dashes optional) names one when exactly
one row starts that way. The lookup is a range scan of the unique index on the id:
``3f2a`` reads the ids from ``3f2a0000-...`` to ``3f2affff-...``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal

from psycopg import AsyncConnection

from govflow.schemas.errors import ConfigError, GovflowError

# How many candidates an ambiguous prefix names.
SHOWN_CANDIDATES = 5
_HEX = re.compile(r"^[0-9a-f]{1,32}$")


class UnknownIdError(GovflowError):
    """No row has that id, or an id that starts that way."""


class AmbiguousIdError(ConfigError):
    """More than one row's id starts that way; a longer prefix tells them apart."""


def prefix_range(prefix: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The lowest and highest UUID starting with ``prefix``; ``None`` if it is no UUID's start."""
    digits = prefix.strip().lower().replace("-", "")
    if not _HEX.match(digits):
        return None
    pad = 32 - len(digits)
    return uuid.UUID(digits + "0" * pad), uuid.UUID(digits + "f" * pad)


IdKind = Literal["execution", "approval", "task"]
# What may be looked up by a prefix, and the table that holds it.
TABLES: dict[IdKind, str] = {
    "execution": "workflow_executions",
    "approval": "approvals",
    "task": "tasks",
}


async def resolve_execution_id(conn: AsyncConnection[Any], text: str) -> str:
    """The full id of the one execution whose id is ``text`` or starts with it.

    Raises:
        UnknownIdError: no execution's id starts with ``text``.
        AmbiguousIdError: more than one does.
    """
    return await resolve_id(conn, "execution", text)


async def resolve_id(conn: AsyncConnection[Any], kind: IdKind, text: str) -> str:
    """The full id of the one ``kind`` (a key of ``TABLES``) whose id is or starts with ``text``.

    Raises:
        UnknownIdError: no such row's id starts with ``text``.
        AmbiguousIdError: more than one does.
    """
    bounds = prefix_range(text)
    if bounds is None:
        raise UnknownIdError(f"no {kind} with id {text}")
    query = f"SELECT id::text FROM {TABLES[kind]} WHERE id BETWEEN %s AND %s ORDER BY id LIMIT %s"
    cur = await conn.execute(query.encode(), (*bounds, SHOWN_CANDIDATES + 1))
    found = [row[0] for row in await cur.fetchall()]
    if not found:
        raise UnknownIdError(f"no {kind} with id {text}")
    if len(found) > 1:
        more = ", …" if len(found) > SHOWN_CANDIDATES else ""
        raise AmbiguousIdError(
            f"{text} is the start of more than one {kind} id"
            f" ({', '.join(found[:SHOWN_CANDIDATES])}{more}): give more of it"
        )
    return str(found[0])
