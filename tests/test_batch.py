"""The array literals a batch's columns travel in reach Postgres as they were."""

from __future__ import annotations

import pytest
from psycopg_pool import AsyncConnectionPool

from govflow.db.batch import text_array

pytestmark = pytest.mark.anyio

AWKWARD = [
    "plain",
    'a "quoted" word',
    'back\\slash and \\" both',
    "{braces, and commas}",
    "NULL",
    None,
    "",
    "  spaces  ",
    "ünï€ode",
    "'single'",
    '{"id": "e-1", "data": {"note": "a \\u0000 escape, kept as text"}}',
]


async def test_text_array_round_trips(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT %s::text[], %s::text[]", (text_array(AWKWARD), text_array([]))
        )
        assert await cur.fetchone() == (AWKWARD, [])
