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
    """A period's money at one instant (nano-dollars)."""

    budget_id: str
    period_id: int
    period_start: datetime
    period_end: datetime | None
    max_budget: int | None
    spend: int
    reserved: int

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


def amount_to_reserve(states: list[PeriodState], amount: int, min_amount: int | None) -> int | None:
    """What to hold in every one of `states` (a request's periods): `amount` if it fits them
    all; else, given a `min_amount` (shrink to fit, SPEC 10), the largest amount from
    `min_amount` up that fits them all; None if nothing may be held."""
    if all(st.fits(amount) for st in states):
        return amount
    if min_amount is None:
        return None
    rooms = [st.max_budget - st.spend - st.reserved for st in states if st.max_budget is not None]
    take = min([amount, *rooms])
    return take if take >= min_amount and all(st.fits(take) for st in states) else None


def tightest(states: list[PeriodState]) -> PeriodState | None:
    """The period with the least room left; unlimited budgets only when nothing else applies."""
    limited = [s for s in states if s.max_budget is not None]
    if limited:
        return min(limited, key=lambda s: (s.remaining, s.period_end is None))
    return states[0] if states else None
