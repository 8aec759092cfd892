"""The async Postgres connection pool, opened so that a bad URL fails at start-up."""

from __future__ import annotations

import anyio
from psycopg_pool import AsyncConnectionPool


async def open_pool(database_url: str, *, max_size: int = 10) -> AsyncConnectionPool:
    """Open a pool and wait for its first connection.

    The pool checks a connection before lending it, so a Postgres restart costs one failed
    check rather than a failed transaction.
    """
    pool = AsyncConnectionPool(
        database_url,
        min_size=1,
        max_size=max_size,
        open=False,
        check=AsyncConnectionPool.check_connection,
        kwargs={"autocommit": False},
        reconnect_timeout=3600,
    )
    try:
        await pool.open(wait=True, timeout=30)
    except BaseException:  # a bad URL, or the caller cancelled: no pool left retrying
        with anyio.CancelScope(shield=True):
            await pool.close()
        raise
    return pool
