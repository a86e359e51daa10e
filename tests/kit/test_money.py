"""Every way an amount is shown, against exact decimal arithmetic."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from app.kit.money import (
    dollars,
    format_dollars,
    format_dollars_nanos,
    format_dollars_up,
    format_usd,
)

LEDGER_AMOUNTS = st.integers(min_value=0, max_value=2**53)


def test_json_dollars() -> None:
    assert dollars(None) is None
    assert dollars(0) == 0.0
    assert dollars(1_500_000_000) == 1.5
    assert dollars(1) == 1e-9


@given(st.integers(min_value=0, max_value=10**15 - 1))
def test_json_dollars_are_exact_to_15_digits(nanos: int) -> None:
    assert Decimal(repr(dollars(nanos))).scaleb(9) == nanos


def test_exact_formats() -> None:
    assert format_dollars(0) == "0.0"
    assert format_dollars(1_500_000_000) == "1.5"
    assert format_dollars(1) == "0.000000001"
    assert format_dollars(-2_000_000_000) == "-2.0"
    assert format_dollars_nanos(10_000_000) == "0.010000000"
    assert format_dollars_nanos(0) == "0.000000000"
    assert format_dollars_nanos(-1) == "-0.000000001"


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_exact_formats_give_back_the_amount(nanos: int) -> None:
    assert Decimal(format_dollars(nanos)).scaleb(9) == nanos
    assert Decimal(format_dollars_nanos(nanos)).scaleb(9) == nanos


def test_rounded_up_never_shows_less() -> None:
    assert format_dollars_up(990_000_000) == "0.9900"
    assert format_dollars_up(1) == "0.0001"
    assert format_dollars_up(0) == "0.0000"
    assert format_dollars_up(1_000_000_000, places=2) == "1.00"


@given(LEDGER_AMOUNTS)
def test_rounded_up_is_the_ceiling(nanos: int) -> None:
    shown = Decimal(format_dollars_up(nanos)).scaleb(9)
    assert nanos <= shown < nanos + 100_000


def test_usd_for_people() -> None:
    assert format_usd(8_020_000_000) == "$8.02"
    assert format_usd(10_000_000_000) == "$10.00"
    assert format_usd(1_234_500_000_000) == "$1,234.50"
    assert format_usd(15_000_000) == "$0.015"
    assert format_usd(1) == "$0.000000001"
    assert format_usd(0) == "$0.00"
