"""Tests for budget period arithmetic: grammar, calendar clamping, DST and properties."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.budgets import periods
from app.budgets.periods import (
    Duration,
    InvalidDuration,
    InvalidTimezone,
    boundary,
    default_anchor,
    load_timezone,
    next_boundary_after,
    parse_duration,
    period_containing,
)

ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/Sao_Paulo",
]
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
SAO_PAULO = ZoneInfo("America/Sao_Paulo")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")

PROPS = settings(max_examples=200, deadline=None)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def d(text: str) -> Duration:
    return parse_duration(text)


# --------------------------------------------------------------------------------------
# strategies

zones = st.sampled_from(ZONES).map(ZoneInfo)
instants = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 12, 31),
    timezones=zones,
)
_MAX_COUNT = {"s": 50, "m": 50, "h": 50, "d": 50, "w": 50, "mo": 24, "y": 5}
durations = st.sampled_from(list(_MAX_COUNT)).flatmap(
    lambda unit: st.integers(1, _MAX_COUNT[unit]).map(lambda n: Duration(n, unit))
)


def reference_k(anchor: datetime, duration: Duration, tz: ZoneInfo, now: datetime) -> int:
    """Largest k with boundary(k) <= now, found by bisection (independent of the estimate)."""
    lo, hi = -1, 1
    while boundary(anchor, duration, tz, lo) > now:
        lo *= 2
    while boundary(anchor, duration, tz, hi) <= now:
        hi *= 2
    while hi - lo > 1:  # boundary(lo) <= now < boundary(hi)
        mid = (lo + hi) // 2
        if boundary(anchor, duration, tz, mid) <= now:
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------------------
# grammar


@pytest.mark.parametrize(
    ("text", "count", "unit"),
    [
        ("30s", 30, "s"),
        ("5m", 5, "m"),
        ("1h", 1, "h"),
        ("1d", 1, "d"),
        ("7d", 7, "d"),
        ("30d", 30, "d"),
        ("1w", 1, "w"),
        ("2w", 2, "w"),
        ("1mo", 1, "mo"),
        ("3mo", 3, "mo"),
        ("1y", 1, "y"),
        ("999999s", 999_999, "s"),
    ],
)
def test_parse_duration_accepts(text: str, count: int, unit: str) -> None:
    parsed = parse_duration(text)
    assert parsed == Duration(count, unit)
    assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0d",
        "-1d",
        "+1d",
        "1",
        "d",
        "mo",
        "1.5h",
        "1 d",
        " 1d",
        "1d ",
        "1d\n",
        "1month",
        "1D",
        "1MO",
        "01d",
        "5x",
        "1000000s",
        "1dd",
        "1m o",
        "１d",  # full-width digit
        "١d",  # Arabic-Indic digit
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidDuration) as excinfo:
        parse_duration(text)
    message = str(excinfo.value)
    assert repr(text) in message
    assert "s, m, h, d, w, mo or y" in message
    assert "30s, 1h, 1d, 7d, 1w, 1mo, 3mo, 1y" in message


def test_invalid_duration_is_value_error_with_documented_message() -> None:
    with pytest.raises(ValueError, match="invalid budget_duration '5x': use a positive integer"):
        parse_duration("5x")


@pytest.mark.parametrize("value", [None, 5, b"1d"])
def test_parse_duration_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidDuration):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("count", "unit"), [(0, "d"), (-1, "d"), (1, "x"), (1, "D"), (True, "d")])
def test_duration_constructor_validates(count: int, unit: str) -> None:
    with pytest.raises(InvalidDuration):
        Duration(count, unit)


@PROPS
@given(durations)
def test_duration_str_round_trips(duration: Duration) -> None:
    assert parse_duration(str(duration)) == duration


# --------------------------------------------------------------------------------------
# timezones


@pytest.mark.parametrize("name", ZONES)
def test_load_timezone_known(name: str) -> None:
    assert load_timezone(name) == ZoneInfo(name)


@pytest.mark.parametrize(
    "name", ["", "Nope/Zone", "utc ", "America", "../etc/passwd", "/etc/passwd", "a\x00b"]
)
def test_load_timezone_unknown(name: str) -> None:
    with pytest.raises(InvalidTimezone, match="IANA timezone name") as excinfo:
        load_timezone(name)
    assert isinstance(excinfo.value, ValueError)
    assert repr(name) in str(excinfo.value)


# --------------------------------------------------------------------------------------
# properties


@PROPS
@given(instants, durations, zones, st.integers(-400, 400))
def test_boundaries_strictly_increasing(
    anchor: datetime, duration: Duration, tz: ZoneInfo, k: int
) -> None:
    here = boundary(anchor, duration, tz, k)
    after = boundary(anchor, duration, tz, k + 1)
    assert here < after
    assert here.tzinfo is UTC and after.tzinfo is UTC


@PROPS
@given(instants, durations, zones)
def test_boundary_zero_is_anchor(anchor: datetime, duration: Duration, tz: ZoneInfo) -> None:
    # Compare in UTC: PEP 495 makes == across zones False for times in a DST fold.
    assert boundary(anchor, duration, tz, 0) == anchor.astimezone(UTC)


@PROPS
@given(instants, durations, zones, instants)
def test_period_containing_brackets_now(
    anchor: datetime, duration: Duration, tz: ZoneInfo, now: datetime
) -> None:
    start, end = period_containing(anchor, duration, tz, now)
    assert start <= now < end
    assert start.tzinfo is UTC and end.tzinfo is UTC
    k = reference_k(anchor, duration, tz, now)
    assert start == boundary(anchor, duration, tz, k)
    assert end == boundary(anchor, duration, tz, k + 1)
    assert next_boundary_after(anchor, duration, tz, now) == end


@PROPS
@given(instants, durations, zones, instants)
def test_periods_are_contiguous(
    anchor: datetime, duration: Duration, tz: ZoneInfo, now: datetime
) -> None:
    start, end = period_containing(anchor, duration, tz, now)
    assert period_containing(anchor, duration, tz, end)[0] == end
    assert period_containing(anchor, duration, tz, end - timedelta(microseconds=1)) == (start, end)
    assert period_containing(anchor, duration, tz, start - timedelta(microseconds=1))[1] == start


@PROPS
@given(instants, durations, zones)
def test_default_anchor_starts_the_period_of_creation(
    created: datetime, duration: Duration, tz: ZoneInfo
) -> None:
    anchor = default_anchor(created, duration, tz)
    assert anchor.tzinfo is UTC
    assert anchor <= created
    assert period_containing(anchor, duration, tz, created)[0] == anchor


@PROPS
@given(instants, durations, zones)
# A wall time that never was (Sao Paulo skipped 00:00-01:00 that night): the instant is
# 2008-10-18 23:00 local, so its day starts on the 18th.
@example(
    datetime(2008, 10, 19, 0, 0, fold=1, tzinfo=SAO_PAULO),
    Duration(1, "d"),
    SAO_PAULO,
)
def test_default_anchor_is_aligned_to_the_unit(
    created: datetime, duration: Duration, tz: ZoneInfo
) -> None:
    anchor = default_anchor(created, duration, tz)
    local = anchor.astimezone(tz)
    # The instant's real wall time (via UTC: astimezone to the zone `created` already has
    # would return it as is, even when it names a time skipped by a DST change).
    created_local = created.astimezone(UTC).astimezone(tz)
    unit = duration.unit
    if unit in ("s", "m", "h"):
        size = {"s": timedelta(seconds=1), "m": timedelta(minutes=1), "h": timedelta(hours=1)}
        assert created - anchor < size[unit]
        if local.utcoffset() == created_local.utcoffset():
            assert local.microsecond == 0
            assert unit == "s" or local.second == 0
            assert unit != "h" or local.minute == 0
        return
    # Local midnight, unless midnight fell in a DST gap (then the first instant after it).
    midnight = datetime.combine(local.date(), datetime.min.time())
    if local.replace(tzinfo=None) != midnight:
        assert midnight.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).hour != 0
        assert local.hour < 2
    if unit == "d":
        assert local.date() == created_local.date()
    elif unit == "w":
        assert local.weekday() == 0
        assert 0 <= (created_local.date() - local.date()).days < 7
    elif unit == "mo":
        assert (local.year, local.month, local.day) == (created_local.year, created_local.month, 1)
    else:
        assert (local.year, local.month, local.day) == (created_local.year, 1, 1)


@PROPS
@given(instants, durations, zones, instants)
def test_period_containing_is_constant_time(
    anchor: datetime, duration: Duration, tz: ZoneInfo, now: datetime
) -> None:
    calls = 0
    real = periods.boundary

    def counting(*args: object) -> datetime:
        nonlocal calls
        calls += 1
        return real(*args)  # type: ignore[arg-type]

    periods.boundary = counting  # type: ignore[assignment]
    try:
        period_containing(anchor, duration, tz, now)
    finally:
        periods.boundary = real
    assert calls <= 5


def test_far_future_thirty_second_periods_are_fast() -> None:
    anchor = utc(2000, 1, 1, 0, 0, 7)
    now = utc(2099, 6, 15, 12, 34, 56, 789)
    start, end = period_containing(anchor, d("30s"), BERLIN, now)
    assert start == utc(2099, 6, 15, 12, 34, 37)
    assert end == utc(2099, 6, 15, 12, 35, 7)


# --------------------------------------------------------------------------------------
# calendar months and years


def test_month_end_clamping_is_computed_from_the_anchor() -> None:
    anchor = utc(2026, 1, 31)
    tz = ZoneInfo("UTC")
    got = [boundary(anchor, d("1mo"), tz, k) for k in range(-1, 4)]
    assert got == [
        utc(2025, 12, 31),
        utc(2026, 1, 31),
        utc(2026, 2, 28),
        utc(2026, 3, 31),
        utc(2026, 4, 30),
    ]
    assert period_containing(anchor, d("1mo"), tz, utc(2026, 3, 15)) == (
        utc(2026, 2, 28),
        utc(2026, 3, 31),
    )


def test_month_clamping_in_a_leap_year() -> None:
    tz = ZoneInfo("UTC")
    assert boundary(utc(2028, 1, 31), d("1mo"), tz, 1) == utc(2028, 2, 29)
    assert boundary(utc(2027, 11, 30), d("3mo"), tz, 1) == utc(2028, 2, 29)
    assert boundary(utc(2026, 11, 30), d("3mo"), tz, 1) == utc(2027, 2, 28)


def test_yearly_from_february_29() -> None:
    tz = ZoneInfo("UTC")
    anchor = utc(2028, 2, 29)
    got = [boundary(anchor, d("1y"), tz, k) for k in range(5)]
    assert got == [
        utc(2028, 2, 29),
        utc(2029, 2, 28),
        utc(2030, 2, 28),
        utc(2031, 2, 28),
        utc(2032, 2, 29),
    ]


def test_months_keep_local_wall_clock_time_across_dst() -> None:
    anchor = datetime(2026, 1, 31, 9, 0, tzinfo=BERLIN)
    got = [boundary(anchor, d("1mo"), BERLIN, k).astimezone(BERLIN) for k in range(3)]
    assert [(g.month, g.day, g.hour) for g in got] == [(1, 31, 9), (2, 28, 9), (3, 31, 9)]
    assert [g.astimezone(UTC).hour for g in got] == [8, 8, 7]


# --------------------------------------------------------------------------------------
# DST: days follow the wall clock, hours do not


@pytest.mark.parametrize(
    ("tz", "short_day", "long_day"),
    [
        (BERLIN, date(2026, 3, 29), date(2026, 10, 25)),
        (NEW_YORK, date(2026, 3, 8), date(2026, 11, 1)),
    ],
)
def test_daily_budgets_reset_at_local_midnight_across_dst(
    tz: ZoneInfo, short_day: date, long_day: date
) -> None:
    anchor = datetime(2026, 1, 1, tzinfo=tz)
    for day, hours in ((short_day, 23), (long_day, 25)):
        noon = datetime.combine(day, datetime.min.time()).replace(hour=12, tzinfo=tz)
        start, end = period_containing(anchor, d("1d"), tz, noon)
        assert start.astimezone(tz).replace(tzinfo=None) == datetime.combine(
            day, datetime.min.time()
        )
        assert end.astimezone(tz).replace(tzinfo=None) == datetime.combine(
            day + timedelta(days=1), datetime.min.time()
        )
        assert end - start == timedelta(hours=hours)


def test_berlin_daily_boundaries_in_utc() -> None:
    anchor = datetime(2026, 3, 28, tzinfo=BERLIN)
    assert [boundary(anchor, d("1d"), BERLIN, k) for k in range(3)] == [
        utc(2026, 3, 27, 23),
        utc(2026, 3, 28, 23),
        utc(2026, 3, 29, 22),
    ]
    anchor = datetime(2026, 10, 24, tzinfo=BERLIN)
    assert [boundary(anchor, d("1d"), BERLIN, k) for k in range(3)] == [
        utc(2026, 10, 23, 22),
        utc(2026, 10, 24, 22),
        utc(2026, 10, 25, 23),
    ]


def test_weekly_budget_spanning_dst_is_167_hours() -> None:
    anchor = datetime(2026, 3, 23, tzinfo=BERLIN)  # a Monday
    start, end = period_containing(
        anchor, d("1w"), BERLIN, datetime(2026, 3, 29, 12, tzinfo=BERLIN)
    )
    assert start == anchor
    assert end == datetime(2026, 3, 30, tzinfo=BERLIN)
    assert end - start == timedelta(hours=167)


def test_hours_are_absolute_elapsed_time_across_dst() -> None:
    anchor = datetime(2026, 3, 29, tzinfo=BERLIN)
    got = [boundary(anchor, d("1h"), BERLIN, k) for k in range(5)]
    assert all(b - a == timedelta(hours=1) for a, b in pairwise(got))
    assert [g.astimezone(BERLIN).hour for g in got] == [0, 1, 3, 4, 5]


def test_gap_resolves_to_first_instant_after_the_gap() -> None:
    # 02:30 does not exist in Berlin on 2026-03-29; the clock jumps 02:00 -> 03:00.
    anchor = datetime(2026, 3, 28, 2, 30, tzinfo=BERLIN)
    got = [boundary(anchor, d("1d"), BERLIN, k) for k in range(3)]
    assert got[1] == utc(2026, 3, 29, 1)  # 03:00 CEST
    assert got[1].astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 29, 3)
    assert got[2].astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 30, 2, 30)


def test_half_hour_gap_in_lord_howe() -> None:
    # Lord Howe jumps 02:00 -> 02:30 on 2026-10-04.
    anchor = datetime(2026, 10, 3, 2, 15, tzinfo=LORD_HOWE)
    got = boundary(anchor, d("1d"), LORD_HOWE, 1).astimezone(LORD_HOWE)
    assert got.replace(tzinfo=None) == datetime(2026, 10, 4, 2, 30)
    assert got.utcoffset() == timedelta(hours=11)


def test_fold_resolves_to_first_occurrence() -> None:
    # 02:30 happens twice in Berlin on 2026-10-25.
    anchor = datetime(2026, 10, 24, 2, 30, tzinfo=BERLIN)
    assert boundary(anchor, d("1d"), BERLIN, 1) == utc(2026, 10, 25, 0, 30)  # 02:30 CEST


def test_anchor_in_second_occurrence_of_a_fold_is_kept() -> None:
    anchor = datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=NEW_YORK)  # 01:30 EST
    assert anchor.astimezone(UTC) == utc(2026, 11, 1, 6, 30)
    assert boundary(anchor, d("1d"), NEW_YORK, 0) == utc(2026, 11, 1, 6, 30)
    assert boundary(anchor, d("1d"), NEW_YORK, 1) == utc(2026, 11, 2, 6, 30)
    assert boundary(anchor, d("1d"), NEW_YORK, -1) == utc(2026, 10, 31, 5, 30)


def test_sao_paulo_midnight_gap_default_anchor() -> None:
    # On 2018-11-04 Sao Paulo jumped 00:00 -> 01:00, so that day started at 01:00 local.
    created = datetime(2018, 11, 4, 10, tzinfo=SAO_PAULO)
    anchor = default_anchor(created, d("1d"), SAO_PAULO)
    assert anchor == utc(2018, 11, 4, 3)
    assert anchor.astimezone(SAO_PAULO).replace(tzinfo=None) == datetime(2018, 11, 4, 1)
    assert next_boundary_after(anchor, d("1d"), SAO_PAULO, created) == utc(2018, 11, 5, 2)


def test_santiago_daily_budget_created_on_a_skipped_midnight_keeps_midnight_resets() -> None:
    # Chile moves 00:00 -> 01:00 on 2026-09-06, so that day starts at 01:00 local.
    santiago = ZoneInfo("America/Santiago")
    created = datetime(2026, 9, 6, 12, tzinfo=santiago)
    anchor = default_anchor(created, d("1d"), santiago)
    assert anchor.astimezone(santiago).replace(tzinfo=None) == datetime(2026, 9, 6, 1)
    local = [boundary(anchor, d("1d"), santiago, k).astimezone(santiago) for k in (-1, 1, 2)]
    assert [b.replace(tzinfo=None) for b in local] == [
        datetime(2026, 9, 5),
        datetime(2026, 9, 7),
        datetime(2026, 9, 8),
    ]


def test_explicit_anchor_on_a_gap_end_is_read_as_the_gap_start() -> None:
    # 03:00 CEST on 2026-03-29 is also where every wall time in 02:00-03:00 lands, so the
    # anchor stands for the earliest of them, 02:00.
    anchor = datetime(2026, 3, 29, 3, tzinfo=BERLIN)
    assert boundary(anchor, d("1d"), BERLIN, 1) == datetime(2026, 3, 30, 2, tzinfo=BERLIN)
    assert boundary(anchor, d("1d"), BERLIN, -1) == datetime(2026, 3, 28, 2, tzinfo=BERLIN)
    # One microsecond later it is an ordinary anchor again.
    later = anchor + timedelta(microseconds=1)
    assert boundary(later, d("1d"), BERLIN, 1) == later + timedelta(days=1)


def test_skipped_calendar_day_gives_an_empty_period_that_is_skipped() -> None:
    # Samoa skipped 2011-12-30 entirely; boundaries merge there but never go backwards.
    apia = ZoneInfo("Pacific/Apia")
    anchor = datetime(2011, 12, 25, tzinfo=apia)
    got = [boundary(anchor, d("1d"), apia, k) for k in range(8)]
    assert all(a <= b for a, b in pairwise(got))
    now = utc(2011, 12, 30, 10)  # 2011-12-31 00:00 local
    start, end = period_containing(anchor, d("1d"), apia, now)
    assert start <= now < end
    assert end - start == timedelta(days=1)


# --------------------------------------------------------------------------------------
# default anchors

CREATED = utc(2026, 5, 14, 13, 47, 12, 345_000)  # Thursday 15:47:12.345 in Berlin (CEST)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", utc(2026, 5, 14, 13, 47, 12)),
        ("1m", utc(2026, 5, 14, 13, 47)),
        ("5m", utc(2026, 5, 14, 13, 47)),
        ("1h", utc(2026, 5, 14, 13)),
        ("6h", utc(2026, 5, 14, 13)),
        ("1d", utc(2026, 5, 13, 22)),
        ("7d", utc(2026, 5, 13, 22)),
        ("30d", utc(2026, 5, 13, 22)),
        ("1w", utc(2026, 5, 10, 22)),  # Monday 2026-05-11 00:00 CEST
        ("2w", utc(2026, 5, 10, 22)),
        ("1mo", utc(2026, 4, 30, 22)),
        ("3mo", utc(2026, 4, 30, 22)),
        ("1y", utc(2025, 12, 31, 23)),  # Jan 1 00:00 CET
    ],
)
def test_default_anchor_examples_berlin(text: str, expected: datetime) -> None:
    assert default_anchor(CREATED, d(text), BERLIN) == expected


def test_default_anchor_thirty_days_is_not_a_month() -> None:
    anchor = default_anchor(CREATED, d("30d"), BERLIN)
    assert boundary(anchor, d("30d"), BERLIN, 1) == utc(2026, 6, 12, 22)


def test_default_anchor_week_uses_the_local_calendar() -> None:
    # Sunday 22:00 in New York is already Monday in UTC; the week is still the previous one.
    created = datetime(2026, 5, 17, 22, tzinfo=NEW_YORK)
    assert created.astimezone(UTC).weekday() == 0
    anchor = default_anchor(created, d("1w"), NEW_YORK)
    assert anchor == datetime(2026, 5, 11, tzinfo=NEW_YORK)
    assert anchor.astimezone(NEW_YORK).weekday() == 0


def test_default_anchor_year_uses_the_local_calendar() -> None:
    created = utc(2027, 1, 1, 3)  # still 2026-12-31 in New York
    assert default_anchor(created, d("1y"), NEW_YORK) == datetime(2026, 1, 1, tzinfo=NEW_YORK)


def test_default_anchor_hour_in_half_hour_offset_zone() -> None:
    created = datetime(2026, 5, 14, 10, 47, tzinfo=KOLKATA)
    assert default_anchor(created, d("1h"), KOLKATA) == utc(2026, 5, 14, 4, 30)


def test_default_anchor_hour_in_second_occurrence_of_a_fold() -> None:
    created = datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=NEW_YORK)  # 01:30 EST
    anchor = default_anchor(created, d("1h"), NEW_YORK)
    assert anchor == utc(2026, 11, 1, 6)  # 01:00 EST, not 01:00 EDT
    assert period_containing(anchor, d("1h"), NEW_YORK, created)[0] == anchor


# --------------------------------------------------------------------------------------
# input validation

Call = Callable[[], object]


@pytest.mark.parametrize(
    "call",
    [
        lambda: boundary(datetime(2026, 1, 1), d("1d"), BERLIN, 1),
        lambda: period_containing(utc(2026, 1, 1), d("1d"), BERLIN, datetime(2026, 1, 2)),
        lambda: default_anchor(datetime(2026, 1, 1), d("1d"), BERLIN),
    ],
)
def test_naive_datetimes_are_rejected(call: Call) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        call()
