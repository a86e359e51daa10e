"""A budget's reset schedule: where its periods start and end. Pure; built from a budget row."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app.budgets.periods import (
    Duration,
    default_anchor,
    load_timezone,
    parse_duration,
    period_containing,
)
from app.errors import InvalidField


@dataclass(frozen=True)
class Schedule:
    duration: Duration | None  # None: a lifetime budget, one period forever
    timezone: str
    anchor: datetime | None  # the effective anchor (explicit, or the default one)

    @classmethod
    def create(
        cls, duration: str | None, timezone: str, explicit_anchor: datetime | None, now: datetime
    ) -> Schedule:
        """A new schedule as of `now`: the explicit anchor, else the start of the unit
        containing `now` in the budget's timezone (1mo -> the 1st, 1w -> Monday, ...)."""
        tz = load_timezone(timezone)
        if duration is None:
            return cls(None, timezone, None)
        parsed = parse_duration(duration)
        try:
            anchor = explicit_anchor or default_anchor(now, parsed, tz)
            schedule = cls(parsed, timezone, anchor)
            schedule.period_at(now)
        except OverflowError:
            # 999999y, or an anchor in year 1 with a long duration: the period around `now`
            # has a boundary no datetime can hold.
            raise InvalidField(
                f"budget_duration: with budget_duration {duration} and this anchor, the period "
                "around now does not fit the supported dates (years 1 to 9999)",
                param="budget_duration",
            ) from None
        return schedule

    def period_at(self, now: datetime) -> tuple[datetime, datetime | None]:
        """The scheduled period containing `now` (missed periods are skipped)."""
        if self.duration is None or self.anchor is None:
            return now, None
        return period_containing(self.anchor, self.duration, load_timezone(self.timezone), now)

    def current_end(self, now: datetime) -> datetime | None:
        return self.period_at(now)[1]
