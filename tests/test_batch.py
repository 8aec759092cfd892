"""The array literals and JSON rows a batch's columns travel in reach Postgres as they were."""

from __future__ import annotations

import pytest
from psycopg_pool import AsyncConnectionPool

from govflow.db.batch import Batched, text_array

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


ROWS = Batched("SELECT id, n, note FROM {rows} ORDER BY n", ("id uuid", "n integer", "note text"))


async def test_batched_rows_round_trip(pool: AsyncConnectionPool) -> None:
    rows = [("00000000-0000-0000-0000-000000000001", 1, 'a "note"'), (None, 2, None)]
    async with pool.connection() as conn:
        cur = await conn.execute(ROWS.statement().encode(), (ROWS.parameter(rows),))
        got = [(str(i) if i else None, n, note) for i, n, note in await cur.fetchall()]
    assert got == rows


def test_a_row_that_does_not_fit_the_columns_is_named_by_them() -> None:
    with pytest.raises(TypeError, match=r"rows of 2 values for the 3 columns \(id uuid, n"):
        ROWS.parameter([("00000000-0000-0000-0000-000000000001", 1, "x"), (None, 2)])
