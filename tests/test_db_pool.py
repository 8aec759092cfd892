"""The pool's connections for lone reads: each statement commits alone, and the
connection goes back to the pool in its usual mode, transactions on."""

from __future__ import annotations

import psycopg
import pytest

from govflow.db.pool import autocommit, open_pool

pytestmark = pytest.mark.anyio


async def test_a_statement_on_an_autocommit_connection_commits_alone(database_url: str) -> None:
    pool = await open_pool(database_url, max_size=1)  # one connection: the same one back
    try:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE probe (n int)")
        async with autocommit(pool) as conn:
            await conn.execute("INSERT INTO probe VALUES (1)")
            # Seen from elsewhere while the block is still open: no transaction holds it.
            async with await psycopg.AsyncConnection.connect(database_url) as other:
                cur = await other.execute("SELECT n FROM probe")
                assert await cur.fetchall() == [(1,)]
        with pytest.raises(psycopg.errors.UndefinedTable):
            async with autocommit(pool) as conn:
                await conn.execute("SELECT * FROM no_such_table")
        async with pool.connection() as conn:
            assert not conn.autocommit
            await conn.execute("INSERT INTO probe VALUES (2)")
            await conn.rollback()  # in a transaction again: the insert is undone
            cur = await conn.execute("SELECT n FROM probe")
            assert await cur.fetchall() == [(1,)]
    finally:
        await pool.close()
