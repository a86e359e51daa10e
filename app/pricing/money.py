"""Exact conversions between dollar amounts and integer nano-dollars.

Money in budgetgate is an ``int`` of nano-dollars. Conversions from dollars go through
exact integer fractions (``Decimal.as_integer_ratio``), never through the decimal context
(whose 28-digit precision would silently round large values) and never through floats.
Charges round *up* to the next whole nano-dollar so they never undercount; amounts users set
(budgets) round to the nearest one.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from fractions import Fraction

from app.kit.money import NANOS_PER_DOLLAR

__all__ = ["NANOS_PER_DOLLAR", "ceil_div", "dollars_to_nanos", "nanos_to_dollars"]


def ceil_div(numerator: int, denominator: int) -> int:
    """``ceil(numerator / denominator)`` in exact integer arithmetic (denominator > 0)."""
    return -(-numerator // denominator)


def _to_decimal(value: Decimal | str | int) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, Decimal | str | int):
        # floats are refused on purpose: 0.1 is not 0.1; pass Decimal or str instead
        raise TypeError(f"expected Decimal, str or int dollars, got {type(value).__name__}")
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    try:
        return Decimal(value.strip())
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None


def dollars_to_nanos(value: Decimal | str | int, *, nearest: bool = False) -> int:
    """Convert dollars to nano-dollars exactly: rounding up to a whole nano-dollar (charges,
    estimates), or to the nearest one, ties to even (amounts a user sets: a budget of
    0.30000000000000004, float noise, is 0.3).

    Raises ValueError for negative, NaN or infinite amounts, TypeError for floats/bools.
    """
    amount = _to_decimal(value)
    if not amount.is_finite():
        raise ValueError(f"dollar amount must be finite, got {value!r}")
    if amount < 0:
        raise ValueError(f"dollar amount must not be negative, got {value!r}")
    numerator, denominator = amount.as_integer_ratio()
    if nearest:
        return round(Fraction(numerator * NANOS_PER_DOLLAR, denominator))
    return ceil_div(numerator * NANOS_PER_DOLLAR, denominator)


def nanos_to_dollars(n: int) -> Decimal:
    """Convert nano-dollars to an exact Decimal dollar amount (9 decimal places)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"expected int nanos, got {type(n).__name__}")
    # built from a string, so exact regardless of the decimal context's precision
    return Decimal(f"{n}E-9")
