"""The compiled price of usage by category equals genai-prices' own calculation."""

from __future__ import annotations

from dataclasses import fields, replace
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from app.pricing.bounds import price_keys, tool_call_fee
from app.pricing.cost import _consistent, _exact_nanos, price_usage
from app.pricing.money import NANOS_PER_DOLLAR, ceil_div
from app.pricing.prices import DEAREST_IMAGE, PriceBook
from app.pricing.usage import Usage
from tests.pricing.test_bounds import BOOK as FILE_BOOK

GENAI = PriceBook()
MODELS = [
    (GENAI, "gpt-4o"),
    (GENAI, "claude-sonnet-4-5"),  # long-context tiers, cache writes 5m/1h
    (GENAI, "gemini-2.5-pro"),  # tiers at 200k
    (GENAI, "gpt-audio"),  # audio in and out
    (FILE_BOOK, "file-audio"),  # cache and audio: the joined price
    (FILE_BOOK, "file-capped"),  # a tool fee of its own
]
PARTS = [f.name for f in fields(Usage)][2:]


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    parts = {p: draw(st.one_of(st.just(0), st.integers(0, 300_000))) for p in PARTS}
    prompt = draw(st.integers(0, 1_200_000))
    return Usage(prompt, draw(st.integers(0, 200_000)), **parts)


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from(MODELS), usage=usages())
def test_compiled_charge_equals_genai_prices(which: tuple[PriceBook, str], usage: Usage) -> None:
    book, model = which
    profile = book.profile(model)
    assert profile is not None
    charged = price_usage(profile, usage)
    # The reference: genai-prices' calculation of the same (consistent) usage, plus the fees
    # of tool calls the price has no fee for, rounded up once.
    price = profile.current()
    fixed = _consistent(usage)
    keys = price_keys(price)
    counts = {"web_searches": "web_searches_kcount", "file_searches": "storage_searches_kcount"}
    counts["code_executions"] = "code_executions_kcount"
    if profile.tool_call_fee is not None:
        calls = fixed.web_searches + fixed.file_searches + fixed.code_executions
        fixed = replace(fixed, web_searches=0, file_searches=0, code_executions=0)
    else:
        calls = sum(getattr(fixed, c) for c, k in counts.items() if k not in keys)
    images = fixed.images_generated * Fraction(DEAREST_IMAGE) * NANOS_PER_DOLLAR  # unpriced data
    exact = _exact_nanos(price, fixed) + calls * tool_call_fee(profile, price) + images
    assert charged == ceil_div(exact.numerator, exact.denominator)


def test_usual_usages_take_the_compiled_path() -> None:
    for book, model in MODELS:
        profile = book.profile(model)
        assert profile is not None
        price_usage(profile, Usage(1000, 100, cache_read_tokens=600, reasoning_tokens=10))
        compiled = [v[1] for k, v in profile.bound_rates.items() if k[0] == "usage"]
        assert compiled and all(c is not None for c in compiled), model
