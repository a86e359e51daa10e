"""Plain values the request path carries between its steps (no ORM objects on the hot path)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class BudgetRef:
    """A budget as the request path needs it: its open period, as of authentication."""

    budget_id: str
    kind: str
    period_id: int
    period_end: datetime | None


@dataclass(frozen=True)
class PeriodState:
    """A period's money at one instant: nano-dollars for a `usd` budget, a count of tokens,
    requests or requests in flight for the other units. And whose budget it is (SPEC 11):
    its owner's kind and name, its unit, its window (budget_duration; None: lifetime)."""

    budget_id: str
    period_id: int
    period_start: datetime
    period_end: datetime | None
    max_budget: int | None
    spend: int
    reserved: int
    unit: str = "usd"
    owner_kind: str = "key"
    owner_name: str | None = None
    window: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> PeriodState:
        """From a budget_periods row (SQLAlchemy `row._mapping`, an asyncpg Record)."""
        return cls(
            budget_id=row["budget_id"],
            period_id=row["id"],
            period_start=row["period_start"],
            period_end=row["period_end"],
            max_budget=row["max_budget"],
            spend=row["spend"],
            reserved=row["reserved"],
            unit=row.get("unit") or "usd",
            owner_kind=row.get("owner_kind") or "key",
            owner_name=row.get("owner_name"),
            window=row.get("budget_duration"),
        )

    def fits(self, amount: int) -> bool:
        """The one comparison (as the SQL statements make it): a reached budget blocks
        everything, and max_budget = 0 blocks every request."""
        used = self.spend + self.reserved
        return self.max_budget is None or (
            used < self.max_budget and used + amount <= self.max_budget
        )

    @property
    def remaining(self) -> int | None:
        if self.max_budget is None:
            return None
        return max(self.max_budget - self.spend - self.reserved, 0)


def unit_amount(unit: str, dollars: int, tokens: int) -> int:
    """What a request holds in a budget of `unit`: its cost bound (nano-dollars), its token
    bound (input + output), or one request (one in flight, for a parallel limit)."""
    if unit == "usd":
        return dollars
    return tokens if unit == "tokens" else 1


def unit_charge(unit: str, cost: int, tokens: int | None, held: int) -> int:
    """What a settled request is charged in a budget of `unit`: its cost; its tokens (input +
    output; what was held when the upstream reported none); one request; nothing for a
    parallel limit (its hold is released)."""
    if unit == "usd":
        return cost
    if unit == "tokens":
        return held if tokens is None else tokens
    return 1 if unit == "requests" else 0


def overrun_of(cost: int, holds: list[tuple[str, int]]) -> int:
    """What the cost passed the request's dollar reservation by (SPEC 10): the same amount is
    held in each dollar period; from what the ledger held, whatever the caller believes."""
    dollars = [amount for unit, amount in holds if unit == "usd"]
    return max(cost - min(dollars), 0) if dollars else 0


def applies_to(models: list[str] | None, model: str | None) -> bool:
    """A budget narrowed to some models applies to requests for them; a request that names no
    model (an operator's extra route) is held by them all, since it may use any."""
    return models is None or model is None or model in models


def amount_to_reserve(
    states: list[PeriodState], amount: int, min_amount: int | None, tokens: int = 0
) -> int | None:
    """The dollars to hold in each dollar period of `states` (a request's periods; the others
    hold their unit's amount, which must fit as it is): `amount` if it fits them all; else,
    given a `min_amount` (shrink to fit, SPEC 10), the largest amount from `min_amount` up that
    fits them all; None if nothing may be held."""
    if not all(st.fits(unit_amount(st.unit, amount, tokens)) for st in states if st.unit != "usd"):
        return None
    dollars = [st for st in states if st.unit == "usd"]
    if all(st.fits(amount) for st in dollars):
        return amount
    if min_amount is None:
        return None
    rooms = [st.max_budget - st.spend - st.reserved for st in dollars if st.max_budget is not None]
    take = min([amount, *rooms])
    return take if take >= min_amount and all(st.fits(take) for st in dollars) else None


def refusing(states: list[PeriodState], least: int, tokens: int) -> PeriodState:
    """The period that refuses a request whose least dollar amount is `least`: a parallel limit
    first (its 429 differs), then the first without room."""
    full = [st for st in states if not st.fits(unit_amount(st.unit, least, tokens))]
    return next((st for st in full if st.unit == "parallel"), full[0] if full else states[0])


def tightest(states: list[PeriodState]) -> PeriodState | None:
    """The dollar budget's period with the least room left; unlimited budgets only when nothing
    else applies (budgets in other units are not compared with dollars)."""
    states = [s for s in states if s.unit == "usd"]
    limited = [s for s in states if s.max_budget is not None]
    if limited:
        return min(limited, key=lambda s: (s.remaining, s.period_end is None))
    return states[0] if states else None
