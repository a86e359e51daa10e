"""The request path's two ledger steps, on the database driver itself.

`admit` (authenticate + reserve, all or none, or record the rejection; its answer is a
Decision) and `settle` (actual cost
replaces the reservation + the ledger entry) run once per request; everything else (rolls,
resets, the sweeper, the admin API) uses SQLAlchemy in app.ledger.periods. Both ledgers group
commit: the steps that arrive together share a transaction, and a step's result is handed back
only after its transaction committed; when one step of a group fails, the group runs again one
step at a time, so that only the failing step fails.

One module per database: app/ledger/sqlite.py and app/ledger/postgres.py.

Why not SQLAlchemy here: the same SQL costs several times less CPU per request on the drivers
than through SQLAlchemy and aiosqlite (bench/ledger_micro.py measures both).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncpg
from prometheus_client import Histogram
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from app.budgets.state import BudgetRef, PeriodState
from app.config import Settings


class ConcurrentChange(RuntimeError):
    """A period kept changing under us; callers treat it as a transient ledger failure."""


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
class KeyContext:
    """What the request path knows about the caller after authentication."""

    id: str
    alias: str | None
    key_prefix: str
    status: str
    models: list[str]
    expires_at: datetime | None
    budgets: list[BudgetRef]
    shrink_to_fit: bool | None = None  # None: BUDGETGATE_SHRINK_TO_FIT decides

    @property
    def label(self) -> str:
        return f"'{self.alias}' ({self.key_prefix}…)" if self.alias else f"({self.key_prefix}…)"


def key_refusal(key: KeyContext | None, now: datetime, model: str | None = None) -> str | None:
    """Why a key may not make a request now: `unknown`, `revoked`, `expired`, or `model` (the
    model is outside its allow-list); None when it may. The one key-status rule: the free paths
    (authentication) and both hot ledgers use it; the PostgreSQL admission statement states the
    same rule in SQL so that it can reserve in the same statement (tests/budgets/test_decisions.py
    holds the two to each other)."""
    if key is None:
        return "unknown"
    if key.status != "active":
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    if not model_allowed(key.models, model):
        return "model"
    return None


def model_allowed(models: list[str], model: str | None) -> bool:
    return model is None or not models or model in models


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
    # budget if it is at least this much (Admitted.amount says what was held). None: all or
    # nothing.
    min_amount: int | None = None

    @property
    def least(self) -> int:
        """The least amount this request may be admitted with."""
        return self.amount if self.min_amount is None else min(self.min_amount, self.amount)


# -- the decision: one of five tagged values ----------------------------------------------


@dataclass(frozen=True)
class Admitted:
    """Every budget had room: `amount` is held in each of `periods` (their state after it);
    less than asked when shrunk to fit."""

    key: KeyContext
    periods: list[PeriodState]
    amount: int


@dataclass(frozen=True)
class Rejected:
    """A budget had no room: `refusing` is its period; the rejection's ledger entry is written."""

    key: KeyContext
    refusing: PeriodState
    amount: int  # what was asked


@dataclass(frozen=True)
class KeyRefused:
    """The key may not make this request (key_refusal's reason); nothing was written."""

    key: KeyContext | None
    reason: str  # unknown | revoked | expired | model


@dataclass(frozen=True)
class PeriodsExpired:
    """A budget's open period has ended: roll these (budget id, period id), then ask again."""

    key: KeyContext
    expired: list[tuple[str, int]]


@dataclass(frozen=True)
class PeriodsChanged:
    """A period was closed under the admission by a concurrent roll or reset: ask again."""

    key: KeyContext


Decision = Admitted | Rejected | KeyRefused | PeriodsExpired | PeriodsChanged


# -- what the ledger records ---------------------------------------------------------------


@dataclass(frozen=True)
class RequestInfo:
    """What the ledger records about a request, known at admission."""

    request_id: str
    key_id: str
    model: str | None
    endpoint: str
    stream: bool
    started_at: datetime


@dataclass(frozen=True)
class Outcome:
    """How a request ended, known at settlement."""

    outcome: str  # ok | upstream_error | client_disconnect | timeout
    cost: int
    cost_source: str  # upstream | prices | estimated | free | reservation | none
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status_code: int | None = None


# Told the kinds of each batch's steps as it starts (HotLedger.observe_batches).
BatchObserver = Callable[[list[str]], None]


class HotLedger(Protocol):
    async def admit(self, req: AdmitRequest, now: datetime) -> Decision: ...

    def settle_soon(
        self, req: RequestInfo, result: Outcome, now: datetime
    ) -> asyncio.Future[list[PeriodState] | None]:
        """Queue the settlement; the future has its periods' state after it (None: nothing was
        held any more, the sweeper released it). It runs to its end whatever happens to its
        caller: await it shielded (asyncio.shield), never cancel it."""
        ...

    @property
    def queued_steps(self) -> int:
        """Steps (admits and settles) waiting for the next batch."""
        ...

    def observe_batches(self, observer: BatchObserver) -> None:
        """Call `observer` with the kinds of each batch's steps ("admit", "settle"), in queue
        order, as the batch starts: to watch group commit at work (tests, diagnostics)."""
        ...

    async def close(self) -> None: ...


def create_hot_ledger(settings: Settings) -> HotLedger:
    url = make_url(settings.database_url)
    pool_size = settings.db_pool_size
    if url.get_backend_name() == "sqlite":
        from app.ledger.sqlite import SqliteHotLedger

        return SqliteHotLedger(url.database or "", settings.sqlite_synchronous)
    from app.ledger.postgres import PostgresHotLedger

    return PostgresHotLedger(
        url.set(drivername="postgresql").render_as_string(hide_password=False), pool_size
    )
