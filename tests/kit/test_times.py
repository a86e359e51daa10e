"""Times in: RFC 3339 or a date, always aware UTC; times out: RFC 3339 with `Z`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.kit.times import InvalidTime, parse_time, rfc3339, to_utc


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12-01T08:00:00", datetime(2026, 12, 1, 8, tzinfo=UTC)),
        ("2026-12-01T08:00:00Z", datetime(2026, 12, 1, 8, tzinfo=UTC)),
        ("2026-12-01t08:00:00z", datetime(2026, 12, 1, 8, tzinfo=UTC)),
        ("2026-12-01 08:00", datetime(2026, 12, 1, 8, tzinfo=UTC)),
        ("2026-12-01T08:00:00+02:00", datetime(2026, 12, 1, 6, tzinfo=UTC)),
        ("2026-12-01T08:00:00.250-01:30", datetime(2026, 12, 1, 9, 30, 0, 250000, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected and parsed.tzinfo is UTC


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-13-01", "2026-12-01T25:00:00Z", "1mo"])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(InvalidTime, match="RFC 3339"):
        parse_time(text)


def test_to_utc() -> None:
    assert to_utc(datetime(2026, 1, 1)) == datetime(2026, 1, 1, tzinfo=UTC)
    plus2 = datetime(2026, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    assert to_utc(plus2).tzinfo is UTC and to_utc(plus2) == plus2
    with pytest.raises(InvalidTime, match="out of range"):
        to_utc(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))


def test_rfc3339() -> None:
    assert rfc3339(datetime(2026, 12, 1, tzinfo=UTC)) == "2026-12-01T00:00:00Z"
    assert rfc3339(datetime(2026, 12, 1, 0, 0, 0, 5, tzinfo=UTC)) == "2026-12-01T00:00:00.000005Z"
    assert rfc3339(datetime(2026, 12, 1, 1, tzinfo=timezone(timedelta(hours=1)))) == (
        "2026-12-01T00:00:00Z"
    )
    assert rfc3339(datetime(2026, 12, 1)) == "2026-12-01T00:00:00Z"  # naive: UTC
