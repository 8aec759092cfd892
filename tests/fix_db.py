"""Postgres for the tests: one migrated template per session, one database per test."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from govflow.db.migrate import migrate
from govflow.db.pool import open_pool
from govflow.runtime.embedded import embedded_postgres
from tests._servers import POSTGRES_IMAGE, docker_engine_answers, run_async


def with_dbname(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` (host, user, options kept)."""
    parts = urlsplit(url)
    # A dbname= option would win over the path; drop it.
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "dbname"])
    new = urlunsplit(parts._replace(path="/" + quote(dbname, safe=""), query=query))
    assert conninfo_to_dict(new)["dbname"] == dbname
    return new


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` (from ``template`` if given); return its URL."""
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(statement)
    return with_dbname(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name``, disconnecting whoever is still connected."""
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture(scope="session")
def embedded_database_url(embedded_data_dir: Path) -> Iterator[str]:
    """The embedded Postgres (bundled by pgserver), whatever TEST_DATABASE_URL says."""
    with embedded_postgres(embedded_data_dir) as url:
        yield url


@pytest.fixture(scope="session")
def database_server_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database on the session's Postgres server, from which we may CREATE DATABASE.

    TEST_DATABASE_URL, else a container, else the embedded server.
    """
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
    elif docker_engine_answers():
        # Imported here: the Docker SDK is not worth loading on a machine without Docker.
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
            yield container.get_connection_url()
    else:
        yield request.getfixturevalue("embedded_database_url")


@pytest.fixture(scope="session")
def template_database(database_server_url: str) -> Iterator[str]:
    """The name of a database migrated once per session, which every test database copies."""
    name = f"govflow_tmpl_{secrets.token_hex(4)}"
    url = create_database(database_server_url, name)
    try:
        run_async(migrate, url)
        yield name
    finally:
        drop_database(database_server_url, name)


@pytest.fixture
def database_url(database_server_url: str, template_database: str) -> Iterator[str]:
    """The URL of a migrated database of this test's own, dropped afterwards."""
    name = f"govflow_t_{secrets.token_hex(4)}"
    url = create_database(database_server_url, name, template=template_database)
    try:
        yield url
    finally:
        drop_database(database_server_url, name)


@pytest.fixture
def empty_database_url(database_server_url: str) -> Iterator[str]:
    """The URL of an empty database (no schema) of this test's own, dropped afterwards."""
    name = f"govflow_e_{secrets.token_hex(4)}"
    url = create_database(database_server_url, name)
    try:
        yield url
    finally:
        drop_database(database_server_url, name)


@pytest.fixture
async def pool(database_url: str, anyio_backend: str) -> AsyncIterator[AsyncConnectionPool]:
    """An open connection pool on this test's database; closed afterwards."""
    opened = await open_pool(database_url, max_size=4)
    try:
        yield opened
    finally:
        await opened.close()
