"""Run Alembic migrations from code, and tell whether a database is at the latest revision."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    ini = _ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(_ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade_to_head(database_url: str) -> None:
    """Synchronous (Alembic's env runs its own event loop): call from a thread when async."""
    command.upgrade(alembic_config(database_url), "head")


async def schema_is_current(engine: AsyncEngine, database_url: str) -> bool:
    heads = set(ScriptDirectory.from_config(alembic_config(database_url)).get_heads())
    async with engine.connect() as conn:
        current = await conn.run_sync(
            lambda c: set(MigrationContext.configure(c).get_current_heads())
        )
    return current == heads
