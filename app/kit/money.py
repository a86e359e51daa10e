"""Showing integer nano-dollar amounts to people and to JSON clients.

The ledger keeps money as an ``int`` of nano-dollars; these are the only ways it is shown.
Each is exact except where its name says it rounds, and none goes through binary floating
point except the JSON number, which is correctly rounded from the exact decimal.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal
from typing import overload

__all__ = [
    "NANOS_PER_DOLLAR",
    "dollars",
    "format_dollars",
    "format_dollars_nanos",
    "format_dollars_up",
    "format_usd",
]

NANOS_PER_DOLLAR = 1_000_000_000


def _exact(nanos: int) -> Decimal:
    # Built from a string: exact whatever the decimal context's precision.
    return Decimal(f"{nanos}E-9")


@overload
def dollars(nanos: int) -> float: ...
@overload
def dollars(nanos: None) -> None: ...
@overload
def dollars(nanos: int | None) -> float | None: ...
def dollars(nanos: int | None) -> float | None:
    """Dollars as a float (the admin API, alerts, logs, metrics): the float nearest the exact
    amount, whose shortest repr gives back the 9-decimal value for every amount of up to 15
    significant digits (all under $1,000,000)."""
    return None if nanos is None else float(_exact(nanos))


def format_dollars(nanos: int) -> str:
    """Exact dollars without trailing zeros, as the budget headers carry them: 1.5, 0.0."""
    text = format_dollars_nanos(nanos).rstrip("0")
    return text + "0" if text.endswith(".") else text


def format_dollars_nanos(nanos: int) -> str:
    """Exact dollars with all nine decimals, for reports that compare amounts: 0.010000000."""
    whole, frac = divmod(abs(nanos), NANOS_PER_DOLLAR)
    return f"{'-' if nanos < 0 else ''}{whole}.{frac:09d}"


def format_dollars_up(nanos: int, places: int = 4) -> str:
    """Dollars to a few places, rounded up, for messages: never shows less than was used."""
    return f"{_exact(nanos).quantize(Decimal(1).scaleb(-places), rounding=ROUND_CEILING)}"


def format_usd(nanos: int) -> str:
    """Dollars for a person: cents, and the smaller digits only when there are any
    ($8.02, $1,234.50, $0.015)."""
    exact = _exact(nanos)
    if exact == exact.quantize(Decimal("0.01")):
        return f"${exact:,.2f}"
    return f"${exact.normalize():,f}"
