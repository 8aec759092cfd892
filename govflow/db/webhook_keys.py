"""The webhook signing keys kept in Postgres: the current one and any still in its grace.

``govflow migrate`` makes the first key; ``govflow webhooks secret --rotate`` makes a new
one and retires the old, which keeps signing for ``GOVFLOW_WEBHOOK_KEY_GRACE`` seconds.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

_NEW_KEY = "'whsec_' || replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')"


async def signing(conn: AsyncConnection[Any], grace_s: float) -> list[str]:
    """The keys that sign now, the newest first."""
    cur = await conn.execute(
        "SELECT secret FROM webhook_keys WHERE retired_at IS NULL"
        " OR retired_at > now() - make_interval(secs => %s) ORDER BY id DESC",
        (grace_s,),
    )
    return [secret for (secret,) in await cur.fetchall()]


async def rotate(conn: AsyncConnection[Any]) -> str:
    """Retire the current key (it stays valid for its grace) and make a new one; return it."""
    await conn.execute("LOCK TABLE webhook_keys IN SHARE ROW EXCLUSIVE MODE")
    await conn.execute("UPDATE webhook_keys SET retired_at = now() WHERE retired_at IS NULL")
    cur = await conn.execute(
        f"INSERT INTO webhook_keys (secret) SELECT {_NEW_KEY} RETURNING secret".encode()
    )
    row = await cur.fetchone()
    assert row is not None  # INSERT ... RETURNING returns the row it made
    return str(row[0])
