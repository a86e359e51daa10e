"""Budget period arithmetic: parse durations and find the period containing an instant.

Everything here is pure (no clock, no I/O) so it can be property-tested. A budget has an
*anchor* instant, a *duration* and an IANA *timezone*; its period boundaries are
``anchor + k * duration`` for every integer ``k``:

* ``s``, ``m``, ``h`` are absolute elapsed time (UTC arithmetic), so DST never stretches
  them.
* ``d`` and ``w`` are wall-clock days in the budget's timezone, so a ``1d`` budget resets
  at local midnight even on 23- and 25-hour days.
* ``mo`` and ``y`` are calendar months/years counted from the anchor (never iteratively),
  with the day clamped to the month's last day and the anchor's local time of day kept.

Wall-clock results are mapped back to instants like this: an ambiguous local time (DST
fold) means its first occurrence (``fold=0``); a non-existent local time (DST gap) means
the first valid instant after the gap, i.e. the transition itself. Both choices keep
boundaries monotonic. Conversely an anchor lying exactly on such a gap end is read as the
gap's *start* wall time, so a daily budget whose default anchor fell on a skipped local
midnight still resets at midnight afterwards. All returned datetimes are aware and in UTC.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "UNITS",
    "Duration",
    "InvalidDuration",
    "InvalidTimezone",
    "boundary",
    "default_anchor",
    "load_timezone",
    "next_boundary_after",
    "parse_duration",
    "period_containing",
]

UNITS: tuple[str, ...] = ("s", "m", "h", "d", "w", "mo", "y")
MAX_COUNT = 999_999

_DURATION_RE = re.compile(r"[1-9][0-9]{0,5}(s|m|h|d|w|mo|y)")
_FORMS_HINT = (
    "use a positive integer followed by s, m, h, d, w, mo or y "
    "(e.g. 30s, 1h, 1d, 7d, 1w, 1mo, 3mo, 1y)"
)
_TZ_HINT = "use an IANA timezone name such as 'UTC', 'Europe/Berlin' or 'America/New_York'"
# Absolute units, in seconds.
_FIXED_SECONDS: dict[str, int] = {"s": 1, "m": 60, "h": 3600}
# Wall-clock day units, in days.
_WALL_DAYS: dict[str, int] = {"d": 1, "w": 7}
# Calendar units, in months.
_CAL_MONTHS: dict[str, int] = {"mo": 1, "y": 12}
_ONE_US = timedelta(microseconds=1)


class InvalidDuration(ValueError):
    """A budget_duration string that does not follow the duration grammar."""


class InvalidTimezone(ValueError):
    """A timezone name that is not a known IANA zone."""


@dataclass(frozen=True)
class Duration:
    """A parsed budget duration such as ``3mo``; validated so bad values cannot exist."""

    count: int
    unit: str

    def __post_init__(self) -> None:
        # Validate here too so a Duration built by hand obeys the same grammar as parsed ones.
        if (
            isinstance(self.count, bool)
            or not isinstance(self.count, int)
            or not 1 <= self.count <= MAX_COUNT
            or self.unit not in UNITS
        ):
            raise InvalidDuration(
                f"invalid budget_duration '{self.count}{self.unit}': {_FORMS_HINT}"
            )

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"


def parse_duration(text: str) -> Duration:
    """Parse ``"7d"``-style text strictly, so typos fail loudly at configuration time."""
    match = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidDuration(f"invalid budget_duration {text!r}: {_FORMS_HINT}")
    unit = match.group(1)
    return Duration(count=int(text[: -len(unit)]), unit=unit)


def load_timezone(name: str) -> ZoneInfo:
    """Load an IANA zone, turning zoneinfo's assorted errors into one clear InvalidTimezone."""
    if not isinstance(name, str) or not name:
        raise InvalidTimezone(f"invalid timezone {name!r}: {_TZ_HINT}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise InvalidTimezone(f"unknown timezone {name!r}: {_TZ_HINT}") from exc


# --------------------------------------------------------------------------------------
# helpers


def _require_aware(value: datetime, what: str) -> None:
    """Naive datetimes would silently mean 'server local time'; refuse them instead."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {value!r}")


def _wall(instant: datetime, tz: tzinfo) -> datetime:
    """The naive local wall-clock reading of ``instant`` in ``tz``."""
    return instant.astimezone(tz).replace(tzinfo=None, fold=0)


def _from_wall(local: datetime, tz: tzinfo) -> datetime:
    """Map a naive wall-clock time in ``tz`` to a UTC instant.

    Ambiguous times (fold) resolve to the first occurrence. Non-existent times (gap)
    resolve to the first valid instant after the gap, found by bisection between the two
    candidate offsets; gaps are at most a day, so this takes under 40 steps and only
    happens for wall times that fall in a gap.
    """
    early = local.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if _wall(early, tz) == local:
        return early
    # In a gap: fold=1 applies the post-transition offset, which lands before the
    # transition; fold=0 applies the pre-transition offset, which lands at/after it.
    lo = local.replace(tzinfo=tz, fold=1).astimezone(UTC)  # wall(lo) < local
    hi = early  # wall(hi) > local
    if lo >= hi or _wall(lo, tz) > local:  # not a plain gap; fall back to fold=0
        return early
    lo_us, hi_us = 0, (hi - lo) // _ONE_US
    # Invariant: wall(lo + lo_us) <= local < wall(lo + hi_us).
    while hi_us - lo_us > 1:
        mid = (lo_us + hi_us) // 2
        if _wall(lo + timedelta(microseconds=mid), tz) > local:
            hi_us = mid
        else:
            lo_us = mid
    return lo + timedelta(microseconds=hi_us)


def _anchor_wall(anchor: datetime, tz: tzinfo) -> datetime:
    """The wall-clock time an anchor stands for, as the base of day/week/month arithmetic.

    Normally its local reading. But an anchor exactly at the end of a DST gap is what
    ``_from_wall`` returns for *every* wall time in the gap, so take the earliest one, the
    gap start: a default ``1d`` anchor on a day whose midnight was skipped (e.g. Santiago
    or pre-2019 Sao Paulo, 00:00 -> 01:00) then keeps resetting at midnight, not 01:00.
    """
    local = _wall(anchor, tz)
    just_before = _wall(anchor - _ONE_US, tz) + _ONE_US
    return just_before if just_before < local else local


def _add_months(local: datetime, months: int) -> datetime:
    """Add calendar months to a naive datetime, clamping the day to the month's end."""
    index = local.year * 12 + (local.month - 1) + months
    year, month0 = divmod(index, 12)
    if not 1 <= year <= 9999:
        raise OverflowError("budget period boundary out of the supported date range")
    month = month0 + 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    return local.replace(year=year, month=month, day=day)


# --------------------------------------------------------------------------------------
# public API


def boundary(anchor: datetime, duration: Duration, tz: ZoneInfo, k: int) -> datetime:
    """Return ``anchor + k * duration`` (UTC), computed from the anchor in one step.

    Computing directly from the anchor (not period by period) keeps month clamping
    stable: Jan 31 gives Feb 28, then Mar 31 again, never Mar 28.
    """
    _require_aware(anchor, "anchor")
    anchor_utc = anchor.astimezone(UTC)
    if k == 0:
        # Exactly the anchor, even if its wall time is the second occurrence of a fold.
        return anchor_utc
    unit = duration.unit
    if unit in _FIXED_SECONDS:
        return anchor_utc + timedelta(seconds=_FIXED_SECONDS[unit] * duration.count * k)
    local = _anchor_wall(anchor_utc, tz)
    if unit in _WALL_DAYS:
        target = local + timedelta(days=_WALL_DAYS[unit] * duration.count * k)
    else:
        target = _add_months(local, _CAL_MONTHS[unit] * duration.count * k)
    return _from_wall(target, tz)


def _estimate_k(anchor: datetime, duration: Duration, tz: ZoneInfo, now: datetime) -> int:
    """Guess the period index of ``now`` by division; exact for s/m/h, off by ~1 otherwise."""
    unit = duration.unit
    if unit in _FIXED_SECONDS:
        step = timedelta(seconds=_FIXED_SECONDS[unit] * duration.count)
        return (now - anchor) // step
    anchor_local, now_local = _wall(anchor, tz), _wall(now, tz)
    if unit in _WALL_DAYS:
        step = timedelta(days=_WALL_DAYS[unit] * duration.count)
        return (now_local - anchor_local) // step
    months = (now_local.year - anchor_local.year) * 12 + (now_local.month - anchor_local.month)
    return months // (_CAL_MONTHS[unit] * duration.count)


def period_containing(
    anchor: datetime, duration: Duration, tz: ZoneInfo, now: datetime
) -> tuple[datetime, datetime]:
    """Return the ``(start, end)`` boundaries with ``start <= now < end``.

    ``k`` is estimated arithmetically and then corrected by a step or two, so the cost
    does not depend on how far ``now`` is from the anchor. If a wall-clock period is
    empty (a whole local day skipped, as in Pacific/Apia on 2011-12-30) it is skipped.
    """
    _require_aware(anchor, "anchor")
    _require_aware(now, "now")
    # Normalise to UTC first: same-tzinfo subtraction is wall-clock arithmetic in Python,
    # and PEP 495 makes == between zones False for folded times.
    anchor, now = anchor.astimezone(UTC), now.astimezone(UTC)
    k = _estimate_k(anchor, duration, tz, now)
    start = boundary(anchor, duration, tz, k)
    while start > now:
        k -= 1
        start = boundary(anchor, duration, tz, k)
    end = boundary(anchor, duration, tz, k + 1)
    while end <= now:
        k += 1
        start, end = end, boundary(anchor, duration, tz, k + 1)
    return start, end


def next_boundary_after(
    anchor: datetime, duration: Duration, tz: ZoneInfo, now: datetime
) -> datetime:
    """The instant the current period ends, i.e. when the budget next resets."""
    return period_containing(anchor, duration, tz, now)[1]


def default_anchor(created_at: datetime, duration: Duration, tz: ZoneInfo) -> datetime:
    """The start of the unit containing ``created_at`` in ``tz``, so periods align to clocks.

    ``d`` -> local midnight, ``w`` -> Monday 00:00 local, ``mo`` -> the 1st 00:00 local,
    ``y`` -> Jan 1 00:00 local; ``h``/``m``/``s`` -> the top of the local hour, minute or
    second. ``30d`` is 30 days from that midnight, not a month.
    """
    _require_aware(created_at, "created_at")
    created_utc = created_at.astimezone(UTC)
    unit = duration.unit
    if unit in _FIXED_SECONDS:
        # Strip the local reading's sub-unit part using created_at's own UTC offset, so the
        # anchor is always less than one unit before created_at (even inside a DST fold).
        local = created_utc.astimezone(tz)
        drop = timedelta(microseconds=local.microsecond)
        if unit in ("m", "h"):
            drop += timedelta(seconds=local.second)
        if unit == "h":
            drop += timedelta(minutes=local.minute)
        return created_utc - drop
    local = _wall(created_utc, tz).replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "w":
        local -= timedelta(days=local.weekday())
    elif unit == "mo":
        local = local.replace(day=1)
    elif unit == "y":
        local = local.replace(month=1, day=1)
    candidate = _from_wall(local, tz)
    # Normally a no-op; it only matters if a DST transition straddles local midnight in a
    # way that would put created_at past the candidate's first boundary.
    return period_containing(candidate, duration, tz, created_utc)[0]
