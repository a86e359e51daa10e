"""The migrations and the models agree, and every migration can be undone and redone."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from app.migrate import alembic_config, upgrade_to_head
from app.models import Base


async def schema_differences(url: str) -> list[Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
    finally:
        await engine.dispose()


async def test_the_migrated_schema_is_the_models_schema(database_url: str) -> None:
    assert await schema_differences(database_url) == []


async def test_every_migration_goes_down_and_up_again(database_url: str) -> None:
    # (Alembic's env runs its own event loop: from a thread)
    await asyncio.to_thread(command.downgrade, alembic_config(database_url), "base")
    await asyncio.to_thread(upgrade_to_head, database_url)
    assert await schema_differences(database_url) == []
