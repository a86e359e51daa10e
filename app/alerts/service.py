"""Budget alerts (SPEC 8, 12), kept in the ledger database as an outbox.

* Thresholds (`alert_at`): each fraction of a budget's max_budget that a period's spend
  reaches, found by the scheduler's pass like soft-budget crossings. The outbox kind names the
  threshold (`threshold:8000`, in basis points), so each one is kept once per period.

* Soft budget crossed: found by the scheduler's pass (a period's spend only grows, so a
  periodic look cannot miss a crossing while the period is open); a `soft_budget` of 0
  alerts on the first spend.
* Exhausted: recorded when a period refuses a request (the 429 path knows which one), in a
  background task, so the request path does not wait for it.
* Exactly once per period per budget: `budget_alerts` has one row per (period, kind), whatever
  number of replicas notice; the next period re-arms both.
* Overrun (SPEC 10): a request charged more than it reserved. Found by the scheduler's pass in
  the ledger entries (settlement records the overrun, in the request's own transaction), and
  alerted once per request per period it was charged to (the outbox row's request id).
* Delivery (app.alerts.webhook: JSON or Slack, signed with BUDGETGATE_ALERT_SECRET): every
  pass POSTs the alerts that are due, one replica per alert at a time (a conditional claim),
  retrying with backoff until the webhook answers 2xx. A replica that dies between the POST and
  recording it sends that alert again: each event has an `id` for the receiver to drop
  duplicates.

Without BUDGETGATE_ALERT_WEBHOOK_URL nothing is recorded or sent.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import aiohttp
from pydantic import SecretStr
from sqlalchemy import (
    Integer,
    Numeric,
    Select,
    String,
    Table,
    and_,
    cast,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from app.alerts.webhook import Webhook, WebhookFormat
from app.budgets.state import PeriodState
from app.clock import Clock
from app.config import Settings
from app.keys.repository import new_id
from app.keys.service import dollars, iso
from app.ledger.contract import KeyContext
from app.models import ApiKey, Budget, BudgetAlert, BudgetPeriod, LedgerCharge, LedgerEntry

A: Table = BudgetAlert.__table__  # type: ignore[assignment]
L: Table = LedgerEntry.__table__  # type: ignore[assignment]
C: Table = LedgerCharge.__table__  # type: ignore[assignment]
P: Table = BudgetPeriod.__table__  # type: ignore[assignment]
B: Table = Budget.__table__  # type: ignore[assignment]
K: Table = ApiKey.__table__  # type: ignore[assignment]

log = logging.getLogger("budgetgate.alerts")

EVENT_TYPES = {
    "threshold": "budget.threshold",
    "soft_budget": "budget.soft_budget_crossed",
    "exhausted": "budget.exhausted",
    "overrun": "budget.overrun",
}
MAX_ATTEMPTS = 12  # backoff 2 s, 4 s, ... capped at 1 h: about 5 hours of retries
CLAIM_SECONDS = 60  # a claimed alert is another replica's again after this (a crashed sender)
POST_TIMEOUT_SECONDS = 10
# A soft-budget crossing in a period that closed before the scheduler's next pass is still
# alerted if the period closed this recently (older history is not: turning alerts on must not
# replay it).
RECENTLY_CLOSED = timedelta(hours=1)
# Likewise, overruns settled this recently are alerted, older ones are not.
RECENT_OVERRUNS = timedelta(hours=1)


def _details(key_id: str, alias: str | None, key_prefix: str, state: PeriodState) -> dict[str, Any]:
    """What both events tell about the key and the period."""
    return {
        "key_id": key_id,
        "alias": alias,
        "key_prefix": key_prefix,
        "spend": dollars(state.spend),
        "max_budget": dollars(state.max_budget),
        "period_start": iso(state.period_start),
        "period_end": iso(state.period_end) if state.period_end else None,
    }


def _periods_with_keys(*columns: Any) -> Select[Any]:
    """Periods with what every alert tells about them and their key (see _period_details), and
    `columns`."""
    return (
        select(
            P.c.id,
            P.c.budget_id,
            P.c.period_start,
            P.c.period_end,
            P.c.spend,
            P.c.max_budget,
            K.c.id.label("key_id"),
            K.c.alias,
            K.c.key_prefix,
            *columns,
        )
        .select_from(P)
        .join(B, B.c.id == P.c.budget_id)
        .join(K, K.c.id == B.c.key_id)
    )


def _period_details(row: Row[Any]) -> tuple[PeriodState, dict[str, Any]]:
    """A _periods_with_keys row's period, and what an alert about it tells."""
    state = PeriodState(
        row.budget_id, row.id, row.period_start, row.period_end, row.max_budget, row.spend, 0
    )
    return state, _details(row.key_id, row.alias, row.key_prefix, state)


class AlertService:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        webhook_url: str | None,
        *,
        webhook_format: WebhookFormat | Literal["auto"] = "auto",
        secret: SecretStr | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.webhook_url = webhook_url
        self.webhook = (
            None if webhook_url is None else Webhook.for_url(webhook_url, webhook_format, secret)
        )
        self._exhausted_seen: set[int] = set()  # periods this process recorded already
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, engine: AsyncEngine, clock: Clock, settings: Settings) -> AlertService:
        return cls(
            engine,
            clock,
            settings.alert_webhook_url,
            webhook_format=settings.alert_webhook_format,
            secret=settings.alert_secret,
        )

    # -- recording -------------------------------------------------------------------------

    async def record_thresholds(self) -> int:
        """Record an alert for every threshold a period's spend has reached that has none yet,
        in the periods of _open_or_recently_closed; returns how many this call recorded."""
        if self.webhook_url is None:
            return 0
        if self.engine.dialect.name == "postgresql":
            elements = func.json_array_elements_text(B.c.alert_at_bp).table_valued("value")
            thresholds = elements.render_derived(name="threshold")
        else:
            thresholds = func.json_each(B.c.alert_at_bp).table_valued("value").alias("threshold")
        basis_points = cast(thresholds.c.value, Integer)
        kind = literal("threshold:") + cast(basis_points, String)
        already = exists().where(and_(A.c.period_id == P.c.id, A.c.kind == kind))
        query = (
            _periods_with_keys(basis_points.label("basis_points"), B.c.budget_duration)
            .join(thresholds, true())
            .where(
                self._open_or_recently_closed(),
                B.c.alert_at_bp.is_not(None),
                # (a limit of 0 is a frozen key, which approaches nothing)
                P.c.max_budget > literal_column("0"),
                P.c.spend > 0,
                # Exact: numeric (no bigint overflow) on PostgreSQL; SQLite's integers turn to
                # floats only past $922,337 budgets, where a nano-dollar is beyond notice.
                cast(P.c.spend, Numeric) * 10_000 >= cast(P.c.max_budget, Numeric) * basis_points,
                ~already,
            )
            .order_by(P.c.id, basis_points)
        )
        recorded = 0
        for r in await self._read(query):
            state, details = _period_details(r)
            details.update(
                threshold=float(Decimal(r.basis_points).scaleb(-4)),
                budget_duration=r.budget_duration,
            )
            recorded += await self._record(f"threshold:{r.basis_points}", state, details)
        return recorded

    async def record_soft_crossings(self) -> int:
        """Record an alert for every period at or past its budget's soft budget that has none
        yet, in the periods of _open_or_recently_closed; returns how many this call recorded."""
        if self.webhook_url is None:
            return 0
        already = exists().where(and_(A.c.period_id == P.c.id, A.c.kind == "soft_budget"))
        query = _periods_with_keys(B.c.soft_budget).where(
            self._open_or_recently_closed(),
            B.c.soft_budget.is_not(None),
            P.c.spend >= B.c.soft_budget,
            P.c.spend > 0,
            ~already,
        )
        recorded = 0
        for r in await self._read(query):
            state, details = _period_details(r)
            details["soft_budget"] = dollars(r.soft_budget)
            recorded += await self._record("soft_budget", state, details)
        return recorded

    def _open_or_recently_closed(self) -> ColumnElement[bool]:
        """The periods a pass looks at for crossings: the open ones, and those closed within the
        last RECENTLY_CLOSED (a crossing in a period that ended before this pass)."""
        return or_(P.c.closed_at.is_(None), P.c.closed_at > self.clock.now() - RECENTLY_CLOSED)

    async def record_overruns(self) -> int:
        """Record an alert for every overrun settled within the last RECENT_OVERRUNS that has
        none yet, one per period the request was charged to; returns how many were recorded."""
        if self.webhook_url is None:
            return 0
        since = self.clock.now() - RECENT_OVERRUNS
        already = exists().where(
            A.c.period_id == C.c.period_id, A.c.kind == "overrun", A.c.request_id == L.c.request_id
        )
        query = (
            _periods_with_keys(L.c.request_id, L.c.cost, L.c.overrun)
            .join(C, C.c.period_id == P.c.id)
            .join(L, L.c.request_id == C.c.request_id)
            # (a literal 0: the partial index's predicate, which a bound parameter would hide)
            .where(L.c.overrun > literal_column("0"), L.c.finished_at > since, ~already)
        )
        recorded = 0
        for r in await self._read(query):
            state, details = _period_details(r)
            details.update(
                request_id=r.request_id,
                reservation=dollars(r.cost - r.overrun),
                cost=dollars(r.cost),
                overrun=dollars(r.overrun),
            )
            recorded += await self._record("overrun", state, details, r.request_id)
        return recorded

    async def _read(self, query: Select[Any]) -> list[Row[Any]]:
        async with self.engine.connect() as conn:
            rows = list((await conn.execute(query)).all())
            await conn.rollback()
        return rows

    def exhausted_soon(self, key: KeyContext, state: PeriodState) -> None:
        """A period refused a request: record (and send) its exhaustion alert in the background,
        once per period per process (the database keeps it once across processes)."""
        if self.webhook_url is None or state.period_id in self._exhausted_seen:
            return
        if len(self._exhausted_seen) >= 100_000:  # (bounded: the table deduplicates anyway)
            self._exhausted_seen.clear()
        self._exhausted_seen.add(state.period_id)
        details = _details(key.id, key.alias, key.key_prefix, state)
        details["reserved"] = dollars(state.reserved)
        task = asyncio.ensure_future(self._exhausted(state, details))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exhausted(self, state: PeriodState, details: dict[str, Any]) -> None:
        try:
            if await self._record("exhausted", state, details):
                await self.deliver_due()
        except Exception as exc:  # the ledger is down: the next refusal records it
            self._exhausted_seen.discard(state.period_id)
            log.warning("recording a budget alert failed: %s", type(exc).__name__)

    async def _record(
        self, kind: str, state: PeriodState, details: dict[str, Any], request_id: str = ""
    ) -> int:
        now = self.clock.now()
        alert_id = new_id("alert")
        values = {
            "id": alert_id,
            "budget_id": state.budget_id,
            "period_id": state.period_id,
            "kind": kind,
            "request_id": request_id,
            "payload": {
                "id": alert_id,
                "type": EVENT_TYPES[kind.partition(":")[0]],
                "budget_id": state.budget_id,
                "created_at": iso(now),
                **details,
            },
            "created_at": now,
            "attempts": 0,
            "next_attempt_at": now,
        }
        insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        statement = (
            insert(A)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["period_id", "kind", "request_id"])
        )
        async with self.engine.begin() as conn:
            return (await conn.execute(statement)).rowcount

    # -- delivery --------------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """POST the alerts that are due; returns how many were delivered."""
        if self.webhook_url is None:
            return 0
        now = self.clock.now()
        async with self.engine.connect() as conn:
            due = (
                await conn.execute(
                    select(A.c.id, A.c.payload, A.c.attempts)
                    .where(A.c.delivered_at.is_(None), A.c.next_attempt_at <= now)
                    .where(A.c.attempts < MAX_ATTEMPTS)
                    .order_by(A.c.created_at)
                    .limit(100)
                )
            ).all()
            await conn.rollback()
        delivered = 0
        for alert in due:
            if await self._claim(alert.id, alert.attempts, now):
                delivered += await self._send(alert.id, alert.payload, alert.attempts + 1)
        return delivered

    async def _claim(self, alert_id: str, attempts: int, now: datetime) -> bool:
        async with self.engine.begin() as conn:
            claimed = await conn.execute(
                update(A)
                .where(A.c.id == alert_id, A.c.attempts == attempts, A.c.delivered_at.is_(None))
                .values(
                    attempts=attempts + 1,
                    next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS),
                )
            )
            return claimed.rowcount == 1

    async def _send(self, alert_id: str, payload: dict[str, Any], attempt: int) -> int:
        assert self.webhook is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT_SECONDS)
            )
        body, headers = self.webhook.request(payload)
        error: str | None = None
        try:
            async with self._session.post(self.webhook.url, data=body, headers=headers) as resp:
                if resp.status >= 300:
                    error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = type(exc).__name__
        now = self.clock.now()
        values: dict[str, Any] = {"delivered_at": now, "last_error": None}
        if error is not None:
            backoff = min(2**attempt, 3600)
            values = {"next_attempt_at": now + timedelta(seconds=backoff), "last_error": error}
            log.warning("budget alert %s not delivered (%s), attempt %d", alert_id, error, attempt)
        else:
            log.info("budget alert %s delivered: %s", alert_id, payload["type"])
        async with self.engine.begin() as conn:
            await conn.execute(update(A).where(A.c.id == alert_id).values(**values))
        return int(error is None)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        if self._session is not None:
            await self._session.close()
