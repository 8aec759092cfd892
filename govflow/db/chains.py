"""How many executions each root event's chain has caused: the bound on a chain's breadth.

A chain's depth is bounded (``GOVFLOW_MAX_CHAIN_DEPTH``), its breadth is not by itself: k
workflows matching every status change give k^depth executions. The trigger matcher adds
the new executions of chained events to their root's count, in the transaction that
records them, and refuses those that would take a root past the bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection

from govflow.db.batch import Batched

_CHARGE = Batched(
    "INSERT INTO chain_executions AS c (tenant, root_id, executions)"
    " SELECT tenant, root_id, executions FROM {rows}"
    " ON CONFLICT (tenant, root_id) DO UPDATE"
    " SET executions = c.executions + excluded.executions, updated_at = now()"
    " RETURNING tenant, root_id, executions",
    ("tenant text", "root_id text", "executions int"),
)


async def charge(
    conn: AsyncConnection[Any], new: Mapping[tuple[str, str], int]
) -> dict[tuple[str, str], int]:
    """Add ``new`` executions to each (tenant, root id); return the totals now."""
    if not new:
        return {}
    rows = sorted((tenant, root, n) for (tenant, root), n in new.items())
    cur = await conn.execute(_CHARGE.statement().encode(), (_CHARGE.parameter(rows),))
    return {(tenant, root): total for tenant, root, total in await cur.fetchall()}
