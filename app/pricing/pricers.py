"""Price functions: ``(input_tokens, output_tokens) -> nano-dollars``, in integer arithmetic.

A price function is resolved once per model name (and cached by the PriceBook); calling one is
a handful of integer multiplications, so it is cheap enough to run on every request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from decimal import Decimal
from fractions import Fraction
from math import gcd, lcm

from app.pricing.money import NANOS_PER_DOLLAR, ceil_div

__all__ = ["Affine", "Pricer", "Segmented"]

Pricer = Callable[[int, int], int]
"""A price function: ``pricer(input_tokens, output_tokens)`` -> nano-dollars (rounded up)."""


class Affine:
    """``ceil((base + input_tokens * per_input + output_tokens * per_output) / denom)`` nanos.

    All four numbers are integers: the exact dollar prices scaled to nano-dollars over a common
    denominator, so the only rounding is the final ceil of the whole charge.
    """

    __slots__ = ("base", "per_input", "per_output", "denom")

    def __init__(self, base: int, per_input: int, per_output: int, denom: int) -> None:
        if denom <= 0 or base < 0 or per_input < 0 or per_output < 0:
            raise ValueError("prices must be non-negative")
        self.base = base
        self.per_input = per_input
        self.per_output = per_output
        self.denom = denom

    @classmethod
    def from_dollars(
        cls,
        base: Decimal | Fraction,
        per_input_token: Decimal | Fraction,
        per_output_token: Decimal | Fraction,
    ) -> Affine:
        """Build from exact dollar amounts: a fixed fee, and dollars per single token."""
        # Fraction(Decimal) is exact, unlike Decimal arithmetic under the context precision.
        ratios = [Fraction(d) for d in (base, per_input_token, per_output_token)]
        denom = lcm(*(r.denominator for r in ratios))
        scaled = [r.numerator * (denom // r.denominator) * NANOS_PER_DOLLAR for r in ratios]
        common = gcd(*scaled, denom)  # keep the integers small: $1/M is 1000 nanos/token over 1
        return cls(scaled[0] // common, scaled[1] // common, scaled[2] // common, denom // common)

    @classmethod
    def per_million(cls, input_per_million: Decimal, output_per_million: Decimal) -> Affine:
        """Build from dollars per 1M input / output tokens."""
        return cls.from_dollars(
            Fraction(0),
            Fraction(input_per_million) / 1_000_000,
            Fraction(output_per_million) / 1_000_000,
        )

    def exact_nanos(self, input_tokens: int, output_tokens: int) -> Fraction:
        """The unrounded charge in nano-dollars (for verification)."""
        total = self.base + input_tokens * self.per_input + output_tokens * self.per_output
        return Fraction(total, self.denom)

    def __call__(self, input_tokens: int, output_tokens: int) -> int:
        return ceil_div(
            self.base + input_tokens * self.per_input + output_tokens * self.per_output,
            self.denom,
        )

    def __repr__(self) -> str:
        return (
            f"Affine(base={self.base}, per_input={self.per_input}, "
            f"per_output={self.per_output}, denom={self.denom})"
        )


class Segmented:
    """Tiered ("cliff") pricing: the affine price depends on which input-token range applies.

    ``thresholds`` are sorted tier starts; a tier applies when ``input_tokens > start``
    (genai-prices' rule), so segment ``k`` covers ``thresholds[k-1] < input_tokens <=
    thresholds[k]`` and is found with ``bisect_left``.
    """

    __slots__ = ("thresholds", "segments")

    def __init__(self, thresholds: Sequence[int], segments: Sequence[Affine]) -> None:
        if len(segments) != len(thresholds) + 1:
            raise ValueError("need one segment more than thresholds")
        self.thresholds = tuple(thresholds)
        self.segments = tuple(segments)

    def segment_for(self, input_tokens: int) -> Affine:
        return self.segments[bisect_left(self.thresholds, input_tokens)]

    def __call__(self, input_tokens: int, output_tokens: int) -> int:
        return self.segments[bisect_left(self.thresholds, input_tokens)](
            input_tokens, output_tokens
        )

    def __repr__(self) -> str:
        return f"Segmented(thresholds={self.thresholds!r}, segments={self.segments!r})"
