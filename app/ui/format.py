"""How the dashboard writes money, shares and times (Jinja filters)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal


def money(nanos: int | None) -> str:
    """Dollars to the cent (what a budget owner reads); amounts under a cent keep four
    decimals, so a small spend does not read as nothing."""
    if nanos is None:
        return "no limit"
    value = Decimal(nanos).scaleb(-9)
    if 0 < abs(value) < Decimal("0.01"):
        return f"${value.quantize(Decimal('0.0001'), ROUND_HALF_EVEN)}"
    cents = value.quantize(Decimal("0.01"), ROUND_HALF_EVEN)
    return f"-${-cents:,}" if cents < 0 else f"${cents:,}"


def amount(value: int | None, unit: str = "usd") -> str:
    """An amount of a budget in its unit: dollars for usd (from nano-dollars), a count of
    tokens or requests otherwise."""
    if unit == "usd" or value is None:
        return money(value)
    return f"{value:,} {unit}"


def dollars(nanos: int | None) -> str:
    """Exact dollars for machines (CSV, chart data): every nano-dollar kept."""
    if nanos is None:
        return ""
    return format(Decimal(nanos).scaleb(-9).normalize(), "f")


def percent(share: float | None) -> str:
    return "—" if share is None else f"{share:.0%}"


def when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def number(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"
