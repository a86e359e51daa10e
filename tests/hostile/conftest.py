"""Fixtures for tests/hostile: the faster (template-copied) SQLite `database_url`, on SQLite and
PostgreSQL like every ledger test."""

from tests.keys.helpers import database_url, pg_reused, sqlite_template

__all__ = ["database_url", "pg_reused", "sqlite_template"]
