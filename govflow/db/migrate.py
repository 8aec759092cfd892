"""Versioned SQL migrations, applied under an advisory lock.

Each file in ``migrations/`` is applied once, in name order, in its own transaction, and
recorded in ``schema_migrations``. The advisory lock makes two concurrent ``govflow
migrate`` runs safe: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

from importlib import resources

import psycopg
import structlog

log = structlog.get_logger(__name__)

# Any fixed 64-bit number; it names govflow's migration lock among a database's locks.
_MIGRATION_LOCK = 0x60F10_0001


def migration_files() -> list[tuple[str, str]]:
    """The (name, SQL) of every migration, in the order they apply."""
    folder = resources.files("govflow.db") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def migrate(database_url: str) -> list[str]:
    """Create or upgrade the schema; return the migrations this call applied."""
    applied: list[str] = []
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT name FROM schema_migrations")
            done = {name for (name,) in await cur.fetchall()}
            for name, sql in migration_files():
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql.encode())
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                log.info("db.migrated", migration=name)
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied
