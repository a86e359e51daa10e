"""The request path's two ledger steps, on the database driver itself.

`admit` (authenticate + reserve, all or none, or record the rejection) and `settle` (actual cost
replaces the reservation + the ledger entry) run once per request; everything else (rolls,
resets, the sweeper, the admin API) uses SQLAlchemy in app.budgets.repository. Both ledgers group
commit: the steps that arrive together share a transaction, and a step's result is handed back
only after its transaction committed; when one step of a group fails, the group runs again one
step at a time, so that only the failing step fails.

One module per database: app/budgets/hotpath_sqlite.py and app/budgets/hotpath_postgres.py.

Why not SQLAlchemy here: measured (bench/ledger_micro.py) 3.6-4.8 ms of CPU per request through
SQLAlchemy + aiosqlite against 0.1-0.7 ms for the same SQL on the drivers.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncpg
from prometheus_client import Histogram
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from app.budgets.repository import Admission, ConcurrentChange, Outcome, RequestInfo
from app.budgets.state import PeriodState
from app.config import Settings
from app.keys.repository import KeyContext

# What the ledger database (or the way to it) raises when it is unavailable: the request path
# answers 503 and forwards nothing (fail closed).
LEDGER_ERRORS = (
    SQLAlchemyError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A pooled connection reused while the server was shutting it down ("cannot switch to
    # state 12; another operation (2) is in progress"): the ledger is unavailable too.
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
    ConcurrentChange,
)


# Steps (admits and settles) per request-path transaction: group commit at work.
BATCH_STEPS = Histogram(
    "budgetgate_ledger_batch_steps",
    "Request-path ledger steps (admits and settles) committed in one transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


@dataclass(frozen=True)
class AdmitRequest:
    key_hash: str
    request_id: str
    model: str | None  # metered requests: checked against the key's allow-list
    endpoint: str
    stream: bool
    amount: int  # nano-dollars to hold in every budget's current period
    started_at: datetime
    expires_at: datetime  # when the sweeper may release the reservation
    # Shrink to fit: when `amount` does not fit, hold the largest amount that fits every
    # budget if it is at least this much (Admission.amount says what was held). None: all or
    # nothing.
    min_amount: int | None = None

    @property
    def least(self) -> int:
        """The least amount this request may be admitted with."""
        return self.amount if self.min_amount is None else min(self.min_amount, self.amount)


@dataclass(frozen=True)
class AdmitResult:
    key: KeyContext | None  # None: no such key
    admission: Admission | None  # None: not attempted (key refused, or a period to roll)
    expired_periods: list[tuple[str, int]]  # (budget id, period id) to roll, then try again
    retry: bool = False  # a period changed under us (a concurrent roll or reset): try again

    def refusal(self, now: datetime) -> str | None:
        """Why the key itself was refused: unknown, revoked, expired, model; None if not."""
        key = self.key
        if key is None:
            return "unknown"
        if key.status != "active":
            return "revoked"
        if key.expires_at is not None and key.expires_at <= now:
            return "expired"
        return None


def model_allowed(models: list[str], model: str | None) -> bool:
    return model is None or not models or model in models


class HotLedger(Protocol):
    async def admit(self, req: AdmitRequest, now: datetime) -> AdmitResult: ...

    def settle_soon(
        self, req: RequestInfo, result: Outcome, now: datetime
    ) -> asyncio.Future[list[PeriodState] | None]:
        """Queue the settlement; the future has its periods' state after it (None: nothing was
        held any more, the sweeper released it). It runs to its end whatever happens to its
        caller: await it shielded (asyncio.shield), never cancel it."""
        ...

    async def close(self) -> None: ...


def create_hot_ledger(settings: Settings) -> HotLedger:
    url = make_url(settings.database_url)
    pool_size = settings.db_pool_size
    if url.get_backend_name() == "sqlite":
        from app.budgets.hotpath_sqlite import SqliteHotLedger

        return SqliteHotLedger(url.database or "", settings.sqlite_synchronous)
    from app.budgets.hotpath_postgres import PostgresHotLedger

    return PostgresHotLedger(
        url.set(drivername="postgresql").render_as_string(hide_password=False), pool_size
    )
