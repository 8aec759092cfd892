"""Migrations: safe to run twice, and from two processes at once."""

from __future__ import annotations

import anyio
import psycopg
import pytest

from govflow.db.migrate import migrate, migration_files

pytestmark = pytest.mark.anyio

# The tables other services read, with their key columns (README.md, "Guarantees").
CONTRACT = {
    "workflows": {"name", "version", "entity", "trigger", "definition", "enabled"},
    "workflow_executions": {
        "id", "workflow_name", "workflow_version", "event_id", "entity_type", "entity_id",
        "tenant", "status", "attempts", "last_error", "created_at", "updated_at", "finished_at",
    },
    "execution_steps": {"execution_id", "step", "action", "status", "attempts", "error"},
    "approvals": {"execution_id", "step"},
    "tasks": {"execution_id", "step"},
    "assignments": {"execution_id", "step"},
    "notifications": {"execution_id", "step"},
    "dead_letters": {
        "id", "stream", "message_id", "payload", "error", "attempts", "created_at", "replayed_at",
    },
    "outbox": {"id", "event", "created_at", "published_at"},
}  # fmt: skip


async def columns_of(url: str) -> dict[str, set[str]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public'"
        )
        found: dict[str, set[str]] = {}
        for table, column in await cur.fetchall():
            found.setdefault(table, set()).add(column)
        return found


def all_migrations() -> list[str]:
    return [name for name, _ in migration_files()]


async def test_migrate_twice_applies_nothing_the_second_time(empty_database_url):
    assert await migrate(empty_database_url) == all_migrations()
    assert await migrate(empty_database_url) == []
    tables = await columns_of(empty_database_url)
    for table, key_columns in CONTRACT.items():
        assert key_columns <= tables.get(table, set()), table


async def test_two_concurrent_migrations_both_succeed(empty_database_url):
    results: list[list[str]] = []

    async def run() -> None:
        results.append(await migrate(empty_database_url))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        tg.start_soon(run)

    # The advisory lock serialises them: one applies everything, the other nothing.
    assert sorted(results, key=len) == [[], all_migrations()]
    assert set(CONTRACT) <= set(await columns_of(empty_database_url))


async def test_each_test_database_is_migrated_and_its_own(database_url, pool):
    assert set(CONTRACT) <= set(await columns_of(database_url))
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT current_database(), count(*) FROM schema_migrations")
        expected = (database_url.rsplit("/", 1)[1].split("?")[0], len(all_migrations()))
        assert await cur.fetchone() == expected


async def test_exactly_once_keys_are_enforced(database_url):
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO workflows (name, version, entity, trigger, definition)"
            " VALUES ('wf', 1, 'policy', 'create', '{}')"
        )
        insert = (
            "INSERT INTO workflow_executions (id, workflow_name, workflow_version, event_id,"
            " entity_type, entity_id, tenant) VALUES (gen_random_uuid(), 'wf', 1, 'e1',"
            " 'policy', 'P1', 'acme')"
        )
        await conn.execute(insert)
        with pytest.raises(psycopg.errors.UniqueViolation):
            await conn.execute(insert)
