"""Fixtures for tests/hostile: the faster (template-copied) SQLite `database_url`, on SQLite and
PostgreSQL like every ledger test; both key modes; a raw recording upstream."""

from collections.abc import Iterator

import pytest

from tests.hostile.raw import RecordingUpstream
from tests.keys.helpers import database_url, pg_reused

__all__ = ["database_url", "pg_reused"]


@pytest.fixture(params=["managed", "passthrough"])
def key_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def recorder() -> Iterator[RecordingUpstream]:
    """An upstream that records each request exactly as it arrives (tests/hostile/raw.py)."""
    rec = RecordingUpstream().start()
    yield rec
    rec.stop()
