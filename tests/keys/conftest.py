"""Fixtures for tests/keys: the faster (template-copied) SQLite `database_url`."""

from tests.keys.helpers import database_url, pg_reused

__all__ = ["database_url", "pg_reused"]
