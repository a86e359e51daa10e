"""The most a provider can bill for a metered request (SPEC 10): its reservation.

Every rate here is the highest that can apply: input at the dearest input category (cache
writes, audio, images cost more than plain input), output at the dearest output category,
every conditional price (time of day, price changes) and every long-context tier the request
can reach. Amounts are exact fractions of a nano-dollar until the final round-up.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from math import lcm
from typing import TYPE_CHECKING

from genai_prices.types import ModelPrice as GenaiModelPrice
from genai_prices.types import TieredPrices

from app.errors import BadRequest
from app.pricing.genai import tier_starts
from app.pricing.money import NANOS_PER_DOLLAR, ceil_div
from app.pricing.prices import DEAREST_IMAGE, ModelProfile

if TYPE_CHECKING:
    from app.proxy.request import MeteredRequest

__all__ = [
    "DEFAULT_TOOL_CALL_FEE",
    "Unboundable",
    "image_price",
    "price_keys",
    "request_bound",
    "tool_call_fee",
]

# Dollars per server-side tool call whose fee the price data does not give: the dearest known
# (Gemini grounding, $35 per 1,000; code interpreter sessions are $0.03).
DEFAULT_TOOL_CALL_FEE = Decimal("0.035")
_TOOL_FEE_KEYS = ("web_searches_kcount", "storage_searches_kcount", "code_executions_kcount")
_AUDIO = "audio"
_NANOS_PER_MTOK = Fraction(NANOS_PER_DOLLAR, 1_000_000)  # $1 per 1M tokens, in nanos per token


class Unboundable(BadRequest):
    """The gateway cannot bound what this request can cost: refused before forwarding."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="cost_not_bounded")


def _at_most(value: Decimal | TieredPrices | None, input_tokens: int) -> Fraction:
    """The highest of a price's tiers that `input_tokens` of input can reach."""
    if value is None:
        return Fraction(0)
    if isinstance(value, TieredPrices):
        reachable = [t.price for t in value.tiers if input_tokens > t.start]
        return Fraction(max([value.base, *reachable]))
    return Fraction(value)


def price_keys(price: GenaiModelPrice) -> dict[str, Decimal | TieredPrices]:
    return {k: v for k, v in vars(price).items() if v is not None and not k.startswith("_")}


def _max_rate(
    price: GenaiModelPrice,
    input_tokens: int,
    *,
    output: bool,
    audio: bool,
    long_cache: bool = True,
) -> tuple[Fraction, bool]:
    """Nano-dollars per token at the dearest input (or output) token category, and whether
    the price has an audio rate for that direction."""
    best, has_audio = Fraction(0), False
    for key, value in price_keys(price).items():
        if not key.endswith("_mtok") or key.startswith("output_") != output:
            continue
        if "_1h_" in key and not long_cache:
            continue
        is_audio = _AUDIO in key
        has_audio |= is_audio and key.startswith(("input_", "output_"))
        if is_audio and not audio:
            continue
        best = max(best, _at_most(value, input_tokens))
    return best * _NANOS_PER_MTOK, has_audio


def tool_call_fee(profile: ModelProfile, price: GenaiModelPrice) -> Fraction:
    """Nano-dollars per fee-bearing tool call: the prices file's fee, else the dearest of
    genai-prices' fees and the default (a tool whose fee is unknown costs the default)."""
    if profile.tool_call_fee is not None:
        return Fraction(profile.tool_call_fee) * NANOS_PER_DOLLAR
    keys = price_keys(price)
    known = [Fraction(_at_most(keys.get(k), 0)) / 1000 for k in _TOOL_FEE_KEYS]
    return max([Fraction(DEFAULT_TOOL_CALL_FEE), *known]) * NANOS_PER_DOLLAR


def image_price(
    table: Mapping[str, Decimal], size: str | None, quality: str | None
) -> Decimal | None:
    """Dollars per generated image at a size and quality: the exact "SIZE/QUALITY" entry, else
    the dearest entry that may apply ("SIZE", "QUALITY", or any when the request does not say);
    None when the model has no per-image price."""
    prices = dict(table)
    if not prices:
        return None
    if "" in prices:
        return prices[""]
    size = size.lower() if size and size != "auto" else None
    quality = quality.lower() if quality and quality != "auto" else None
    if size and quality and f"{size}/{quality}" in prices:
        return prices[f"{size}/{quality}"]

    def applies(key: str) -> bool:
        key_size, sep, key_quality = key.partition("/")
        if not sep:  # one of the two: a size has digits ("1024x1024"), a quality none
            if any(c.isdigit() for c in key):
                key_size, key_quality = key, ""
            else:
                key_size, key_quality = "", key
        return (not size or not key_size or key_size == size) and (
            not quality or not key_quality or key_quality == quality
        )

    matching = [p for k, p in prices.items() if applies(k)]
    return max(matching or prices.values())


def _input_tokens_per_pass(profile: ModelProfile, m: MeteredRequest) -> int:
    window = profile.context_window
    per_image = profile.max_tokens_per_image
    if m.unmeasured or (m.images and per_image is None):
        if window is None:
            what = ", ".join(m.unmeasured) or "image parts"
            raise Unboundable(
                f"the request carries input the gateway cannot measure ({what}) and model "
                f"'{m.model}' has no known context window to bound it by; set its "
                "context_window (or max_tokens_per_image) in the prices file"
            )
        return window
    tokens = m.input_bound + m.images * (per_image or 0)
    return min(tokens, window) if window is not None else tokens


@dataclass(frozen=True, slots=True)
class _Rates:
    """One price's dearest rates for one kind of request, by how many long-context tiers its
    input reaches: nano-dollars per input token, output token, tool call and request, as
    integers over `denom` (so a bound is integer arithmetic and one round-up)."""

    starts: tuple[int, ...]  # tier starts; segment k applies to input past k of them
    segments: tuple[tuple[int, int, int, int], ...]
    denom: int
    audio_input_priced: bool
    audio_output_priced: bool


def _compile_rates(
    profile: ModelProfile,
    price: GenaiModelPrice,
    audio_in: bool,
    audio_out: bool,
    long: bool,
    image_tool: bool,
) -> _Rates:
    keys = price_keys(price)
    starts = tier_starts(price)
    exact: list[tuple[Fraction, ...]] = []
    in_audio = out_audio = False
    for k in range(len(starts) + 1):
        probe = starts[k - 1] + 1 if k else 0  # the least input that reaches k tiers
        in_rate, in_audio = _max_rate(price, probe, output=False, audio=audio_in, long_cache=long)
        out_rate, out_audio = _max_rate(price, probe, output=True, audio=audio_out)
        per_request = _at_most(keys.get("requests_kcount"), probe) * NANOS_PER_DOLLAR / 1000
        per_call = tool_call_fee(profile, price)
        if image_tool:  # a call may generate an image
            per_call = max(per_call, Fraction(DEAREST_IMAGE) * NANOS_PER_DOLLAR)
        exact.append((in_rate, out_rate, per_call, per_request))
    denom = lcm(*(r.denominator for rates in exact for r in rates))
    segments = tuple(
        (a.numerator * (denom // a.denominator), b.numerator * (denom // b.denominator),
         c.numerator * (denom // c.denominator), d.numerator * (denom // d.denominator))
        for a, b, c, d in exact
    )  # fmt: skip
    return _Rates(tuple(starts), segments, denom, in_audio, out_audio)


def token_counts(profile: ModelProfile | None, m: MeteredRequest) -> tuple[int, int]:
    """The most input and output tokens the request can be billed for, if answered by the
    model of `profile` (None: an unpriced model, its input measured from the body)."""
    per_pass = m.input_bound if profile is None else _input_tokens_per_pass(profile, m)
    input_tokens = per_pass * m.passes
    per_sampling = m.output_bound + m.prediction_bound
    # /responses' max_output_tokens spans its whole tool loop; elsewhere each pass may write
    # up to the cap.
    output_passes = 1 if m.endpoint == "/responses" else m.passes
    return input_tokens, per_sampling * m.samplings * output_passes


def _token_bound(profile: ModelProfile, m: MeteredRequest) -> int:
    input_tokens, output_tokens = token_counts(profile, m)
    # Audio input is dearer than text: counted when the request may carry audio.
    kind = (m.audio_input or bool(m.unmeasured), m.audio_output, m.long_cache_writes, m.image_tool)
    tables = profile.bound_rates.get(kind)
    if tables is None:
        tables = [_compile_rates(profile, price, *kind) for price in profile.prices]
        profile.bound_rates[kind] = tables
    worst = 0
    for rates in tables:
        if m.audio_input and not rates.audio_input_priced:
            raise Unboundable(f"model '{m.model}' has no known audio input price")
        if m.audio_output and not rates.audio_output_priced:
            raise Unboundable(f"model '{m.model}' has no known audio output price")
        per_input, per_output, per_call, per_request = rates.segments[
            bisect_left(rates.starts, input_tokens)
        ]
        total = (
            input_tokens * per_input
            + output_tokens * per_output
            + m.tool_calls * per_call
            + m.samplings * m.passes * per_request
        )
        worst = max(worst, ceil_div(total, rates.denom))
    return worst


def _images_bound(profile: ModelProfile, m: MeteredRequest) -> Fraction:
    each = image_price(profile.per_image, m.image_size, m.image_quality)
    if each is None:
        raise Unboundable(f"model '{m.model}' has no known per-image price")
    prompt = max(
        _max_rate(price, m.input_bound, output=False, audio=False)[0] for price in profile.prices
    )
    return m.samplings * Fraction(each) * NANOS_PER_DOLLAR + m.input_bound * prompt


def _speech_bound(profile: ModelProfile, m: MeteredRequest) -> Fraction:
    per_million = [_at_most(price_keys(p).get("input_mchars"), 0) for p in profile.prices]
    if not any(price_keys(p).get("input_mchars") is not None for p in profile.prices):
        raise Unboundable(
            f"model '{m.model}' has no known price per character of speech input; set its "
            "per_million_characters in the prices file"
        )
    return m.characters * max(per_million) * NANOS_PER_DOLLAR / 1_000_000


def request_bound(profile: ModelProfile, m: MeteredRequest) -> int:
    """Nano-dollars (rounded up): the most the request can be billed if answered by the model
    of `profile`."""
    if m.endpoint == "/images/generations":
        exact = _images_bound(profile, m)
    elif m.endpoint == "/audio/speech":
        exact = _speech_bound(profile, m)
    else:
        return _token_bound(profile, m)
    return ceil_div(exact.numerator, exact.denominator)
