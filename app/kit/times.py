"""Times as the API and the command line take them, and as they show them: aware UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime

__all__ = ["InvalidTime", "parse_time", "rfc3339", "to_utc"]


class InvalidTime(ValueError):
    """Text that is not an RFC 3339 time or a date."""


def to_utc(value: datetime) -> datetime:
    """The same instant in UTC; a time without an offset is taken as UTC, wherever it was
    typed (so that stored and compared times never depend on a machine's zone)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first UTC time there is
        raise InvalidTime("out of range once converted to UTC") from None


def parse_time(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time (`2026-12-01T08:00:00Z`, `…+02:00`, `2026-12-01 08:00`) or
    a bare date (`2026-12-01`, its midnight), as an aware UTC datetime."""
    value = text.strip()
    try:
        if len(value) == 10:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
        else:
            # fromisoformat reads `Z` and `T` or a space; a lower-case `t`/`z` is RFC 3339 too.
            parsed = datetime.fromisoformat(value.replace("t", "T").replace("z", "Z"))
    except ValueError:
        raise InvalidTime(
            f"not a time: {text!r} (expected RFC 3339, e.g. 2026-12-01T08:00:00Z, or a date)"
        ) from None
    return to_utc(parsed)


def rfc3339(when: datetime) -> str:
    """RFC 3339 in UTC with a `Z`; fractions of a second only when there are any."""
    utc = to_utc(when)
    if utc.microsecond == 0:
        return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
