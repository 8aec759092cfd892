"""Postgres: migrations, the connection pool and the named queries."""
