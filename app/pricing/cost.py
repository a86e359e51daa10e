"""A request's cost: its upper bound before forwarding, and its actual cost after (SPEC 4, 10)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields, replace
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import TYPE_CHECKING

from genai_prices import Usage as GenaiUsage
from genai_prices.types import ModelPrice as GenaiModelPrice

from app.errors import BadRequest
from app.pricing.bounds import price_keys, request_bound, token_counts, tool_call_fee
from app.pricing.categories import UsagePrice, compile_usage_price
from app.pricing.money import NANOS_PER_DOLLAR, ceil_div, dollars_to_nanos
from app.pricing.prices import DEAREST_IMAGE, ModelProfile, PriceBook
from app.pricing.usage import Usage

if TYPE_CHECKING:
    from app.proxy.request import MeteredRequest

log = logging.getLogger("budgetgate.pricing")

COST_HEADER = "x-litellm-response-cost"
_NANO = Decimal("1e-9")
# Usage's tool counts and the genai-prices price key of each.
_TOOL_COUNTS = {
    "web_searches": "web_searches_kcount",
    "file_searches": "storage_searches_kcount",
    "code_executions": "code_executions_kcount",
}


_CACHED_AUDIO = {
    "cache_read_tokens": "cache_audio_read_tokens",
    "cache_write_5m_tokens": "cache_audio_write_5m_tokens",
    "cache_write_1h_tokens": "cache_audio_write_1h_tokens",
    "cache_write_tokens": "cache_audio_write_tokens",
}


_PARTS = tuple(f.name for f in fields(Usage))[2:]


def _genai_usage(usage: Usage) -> GenaiUsage:
    values = {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_5m_tokens": usage.cache_write_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "cache_write_tokens": usage.cache_write_tokens + usage.cache_write_1h_tokens,
        "input_audio_tokens": usage.input_audio_tokens,
        "output_audio_tokens": usage.output_audio_tokens,
        "output_reasoning_tokens": usage.reasoning_tokens,
        "web_searches": usage.web_searches,
        "storage_searches": usage.file_searches,
        "code_executions": usage.code_executions,
    }
    reported = {k: v for k, v in values.items() if v}
    if usage.input_audio_tokens:
        # genai-prices wants the cached audio said when cache and audio are both reported;
        # no upstream says it, and _consistent made room for none: the cached tokens are text
        # (audio stays at its full audio price).
        for cache, cached_audio in _CACHED_AUDIO.items():
            if cache in reported:
                reported[cached_audio] = 0
    return GenaiUsage(**reported)


def _consistent(usage: Usage) -> Usage:
    """Parts never exceed their whole (an upstream's inconsistent report must not make
    genai-prices refuse it): the whole is raised to the sum of its parts."""
    cached = usage.cache_read_tokens + usage.cache_write_tokens + usage.cache_write_1h_tokens
    prompt = max(usage.prompt_tokens, cached + usage.input_audio_tokens)
    completion = max(usage.completion_tokens, usage.output_audio_tokens + usage.reasoning_tokens)
    if prompt == usage.prompt_tokens and completion == usage.completion_tokens:
        return usage
    return replace(usage, prompt_tokens=prompt, completion_tokens=completion)


def price_usage(profile: ModelProfile, usage: Usage) -> int | None:
    """Nano-dollars (rounded up) for the usage at the model's current price, each category at
    its own price by genai-prices' own calculation; None when the model is not priced per
    token. Plain input/output usage takes the compiled price function (the hot path)."""
    if usage.is_plain() and profile.pricer is not None:
        return profile.pricer(usage.prompt_tokens, usage.completion_tokens)
    if profile.pricer is None:
        return None
    price: GenaiModelPrice = profile.current()
    usage = _consistent(usage)
    fees = Fraction(usage.images_generated * DEAREST_IMAGE * NANOS_PER_DOLLAR)
    if usage.tool_calls() - usage.images_generated:
        # Tool calls the price data has no fee for cost the bound's fee (the file's, or the
        # default).
        keys = price_keys(price)
        unpriced_calls = sum(
            getattr(usage, count)
            for count, key in _TOOL_COUNTS.items()
            if key not in keys or profile.tool_call_fee is not None
        )
        if profile.tool_call_fee is not None:
            usage = replace(usage, web_searches=0, file_searches=0, code_executions=0)
        fees += unpriced_calls * tool_call_fee(profile, price)
    parts = tuple(p for p in _PARTS if getattr(usage, p) and p != "images_generated")
    key = ("usage", id(price), parts)
    cached = profile.bound_rates.get(key)
    if cached is None or cached[0] is not price:
        cached = (price, compile_usage_price(price, parts, _exact_nanos))
        profile.bound_rates[key] = cached
    compiled: UsagePrice | None = cached[1]
    if compiled is not None:  # one round-up of the whole charge, in integers
        numerator = compiled.numerator(usage) * fees.denominator + fees.numerator * compiled.denom
        return ceil_div(numerator, compiled.denom * fees.denominator)
    exact = _exact_nanos(price, usage) + fees
    return ceil_div(exact.numerator, exact.denominator)


def _exact_nanos(price: GenaiModelPrice, usage: Usage) -> Fraction:
    """genai-prices' price of the usage, in nano-dollars, unrounded."""
    return Fraction(price.calc_price(_genai_usage(usage))["total_price"]) * NANOS_PER_DOLLAR


class CostCalculator:
    def __init__(self, book: PriceBook, unpriced_model: str, trust_upstream_cost: bool) -> None:
        self.book = book
        self.reject_unpriced = unpriced_model == "reject"
        self.trust_upstream_cost = trust_upstream_cost

    def _unpriced(self, model: str) -> int:
        if self.reject_unpriced:
            raise BadRequest(
                f"model '{model}' has no known price, so its cost cannot be bounded; add it to "
                "the prices file (BUDGETGATE_PRICES_FILE) or set BUDGETGATE_UNPRICED_MODEL=free",
                param="model",
                code="model_not_priced",
            )
        return 0

    def bound(self, metered: MeteredRequest) -> int:
        """The reservation (nano-dollars): the most the request can be billed, answered by its
        model or any model the prices file says it may be answered as (SPEC 10); 0 for an
        unpriced model let through by BUDGETGATE_UNPRICED_MODEL=free."""
        profiles = self._answering(metered)
        if not profiles:
            return self._unpriced(metered.model)
        return max(request_bound(profile, metered) for profile in profiles)

    def token_bound(self, metered: MeteredRequest) -> int:
        """The most input + output tokens the request can be billed for (what a `tokens`
        budget holds, SPEC 11), answered by any model it may be answered as."""
        profiles: list[ModelProfile | None] = [*self._answering(metered)] or [None]
        return max(sum(token_counts(profile, metered)) for profile in profiles)

    def _answering(self, metered: MeteredRequest) -> list[ModelProfile]:
        """The priced profiles of the request's model and of every model the prices file says
        it may be answered as (transitively); none for an unpriced model."""
        profile = self.book.profile(metered.model)
        if profile is None or (
            profile.pricer is None
            and metered.endpoint not in ("/images/generations", "/audio/speech")
        ):
            return []
        # A model it may be answered as may itself be answered as others: all of them count.
        found, seen, pending = [profile], {metered.model}, list(profile.answers_as)
        while pending:
            name = pending.pop()
            answering = self.book.profile(name) if name not in seen else None
            seen.add(name)
            if answering is not None:  # every answers_as is priced (checked at load)
                found.append(answering)
                pending.extend(answering.answers_as)
        return found

    def bound_with_output(self, metered: MeteredRequest, output_tokens: int) -> int:
        """The bound the request would have with another output bound (shrink to fit: the
        least it may be held at is this at BUDGETGATE_MIN_OUTPUT_TOKENS)."""
        asked = metered.output_bound
        metered.output_bound = output_tokens
        try:
            return self.bound(metered)
        finally:
            metered.output_bound = asked

    def fit_output(self, metered: MeteredRequest, room: int, minimum: int) -> int | None:
        """Shrink to fit (SPEC 10): the largest output bound, no larger than the request's and
        no smaller than `minimum`, whose bound fits in `room` nano-dollars; None if none does.
        The bound grows with the output bound, so a binary search finds it."""
        if metered.output_field is None or metered.output_bound < minimum:
            return None
        if self.bound_with_output(metered, minimum) > room:
            return None
        low, high = minimum, metered.output_bound
        while low < high:  # invariant: low fits
            middle = (low + high + 1) // 2
            if self.bound_with_output(metered, middle) <= room:
                low = middle
            else:
                high = middle - 1
        return low

    def estimate(self, model: str, input_tokens: int, output_tokens: int) -> int:
        """Price of a plain usage of one model (nano-dollars); 0 for an unpriced model let
        through by BUDGETGATE_UNPRICED_MODEL=free."""
        amount = self.book.estimate(model, input_tokens, output_tokens)
        return self._unpriced(model) if amount is None else amount

    def from_header(self, value: str | None) -> int | None:
        if value is None or not self.trust_upstream_cost:
            return None
        try:
            # LiteLLM writes a binary float (3.6000000000000003e-06): round it to the nearest
            # nano-dollar first, so its float noise does not cost a nano-dollar more than the
            # same request priced from usage.
            dollars = Decimal(value.strip()).quantize(_NANO, rounding=ROUND_HALF_EVEN)
            return dollars_to_nanos(dollars)
        except (ValueError, TypeError, ArithmeticError):
            log.warning("ignoring unreadable %s header", COST_HEADER)
            return None

    def from_usage(self, models: list[str | None], usage: Usage) -> int | None:
        """The usage priced by the first priced model of `models` (the response's model is
        passed first: an answer by a dearer model is charged at its price)."""
        for model in models:
            profile = self.book.profile(model) if model else None
            if profile is not None and profile.pricer is not None:
                return price_usage(profile, usage)
        return None

    def charge(
        self,
        header: str | None,
        models: list[str | None],
        usage: Usage | None,
        estimate: Usage | None,
        bound: Callable[[], int],
    ) -> tuple[int, str]:
        """Cost and its source, in SPEC order: upstream header, usage x price, an estimate from
        what was forwarded (`estimate` priced, never above the request's `bound`, the most it
        can be billed; with no estimate, the bound itself: images and speech are priced per
        unit the request names); `free` for an unpriced model."""
        from_header = self.from_header(header)
        if from_header is not None:
            return from_header, "upstream"
        if usage is not None:
            cost = self.from_usage(models, usage)
            if cost is not None:
                return cost, "prices"
        if estimate is None:
            return bound(), "estimated"
        cost = self.from_usage(models, estimate)
        if cost is None:
            return 0, "free"
        return min(cost, bound()), "estimated"
