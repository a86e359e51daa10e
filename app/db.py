"""Engine factory and the dialect details the ledger depends on."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.config import Settings


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(
            settings.database_url, settings.sqlite_synchronous, **overrides
        )
    kwargs: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_pool_size,
        "pool_timeout": 10,
        "pool_recycle": 1800,
    }
    kwargs.update(overrides)
    engine = create_async_engine(settings.database_url, **kwargs)
    event.listen(engine.sync_engine, "checkout", _discard_closed_connection)
    return engine


def _discard_closed_connection(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection the server closed while it sat idle (PostgreSQL restarted or
    failed over) is replaced at checkout instead of failing the request that drew it (a 503,
    or a settlement left to the sweeper). A local flag, no round trip (unlike pool_pre_ping)."""
    driver = getattr(dbapi_connection, "driver_connection", None)
    is_closed = getattr(driver, "is_closed", None)
    if is_closed is not None and is_closed():
        raise DisconnectionError("pooled connection was closed by the server")


def _create_sqlite_engine(database_url: str, synchronous: str, **overrides: Any) -> AsyncEngine:
    # One connection: SQLite serialises writers anyway; queueing in the pool is cheaper than
    # busy-waiting on the database lock. Other processes (the CLI) are handled by busy_timeout.
    kwargs: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 60}
    kwargs.update(overrides)
    engine = create_async_engine(database_url, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of pysqlite's deferred
        # BEGIN: every transaction takes the write lock up front, so a multi-statement step
        # (reserve against several budgets, roll a period) is atomic without row locks.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")  # see Settings
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
