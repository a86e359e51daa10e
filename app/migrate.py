"""Run Alembic migrations from code, and tell whether a database is at the latest revision."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine


def _project_root() -> Path:
    """The directory holding migrations/: the source checkout (editable install), else the
    working directory (the Docker image copies migrations/ next to where it runs)."""
    source = Path(__file__).resolve().parent.parent
    return source if (source / "migrations").is_dir() else Path.cwd()


def alembic_config(database_url: str) -> Config:
    root = _project_root()
    ini = root / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(root / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade_to_head(database_url: str) -> None:
    """Synchronous (Alembic's env runs its own event loop): call from a thread when async."""
    command.upgrade(alembic_config(database_url), "head")


async def current_revisions(engine: AsyncEngine) -> set[str]:
    """The revisions the database is at (none for a database never migrated)."""
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: set(MigrationContext.configure(c).get_current_heads()))


async def schema_is_current(engine: AsyncEngine, database_url: str) -> bool:
    heads = set(ScriptDirectory.from_config(alembic_config(database_url)).get_heads())
    return await current_revisions(engine) == heads


def pending_revisions(database_url: str, current: set[str]) -> list[Script]:
    """The migrations an upgrade from `current` to the latest applies, oldest first."""
    scripts = ScriptDirectory.from_config(alembic_config(database_url))
    lower = tuple(current) or "base"
    return [
        s
        for s in reversed(list(scripts.iterate_revisions("heads", lower)))
        if s.revision not in current
    ]
