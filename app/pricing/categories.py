"""Usage by category priced by genai-prices' own calculation, compiled for the hot path.

``ModelPrice.calc_price`` costs ~50-100 µs a call. Within one long-context tier range it is
affine in every count of the usage (its leaves are differences of the counts, each times a
price), so, as genai.compile_model_price does for plain input/output, it is probed once per
price and set of categories, the affine pieces are checked against it at a further point, and
a request's charge is then a few integer operations. Anything that does not check out is
priced by calling genai-prices each time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from math import lcm

from genai_prices.types import ModelPrice as GenaiModelPrice

from app.pricing.genai import tier_starts
from app.pricing.usage import Usage

__all__ = ["UsagePrice", "compile_usage_price"]

_PROBE = 16  # room for a probe unit of every part inside the whole
_FAR = 12_345_678  # how far the last (unbounded) tier range is checked


@dataclass(frozen=True, slots=True)
class UsagePrice:
    """Nano-dollars of a usage with these parts: per tier range, integers over `denom` for
    the constant, prompt, completion and each part."""

    parts: tuple[str, ...]
    starts: tuple[int, ...]
    segments: tuple[tuple[int, ...], ...]
    denom: int

    def numerator(self, usage: Usage) -> int:
        """The exact price is this over `denom` nano-dollars."""
        c = self.segments[bisect_left(self.starts, usage.prompt_tokens)]
        total = c[0] + c[1] * usage.prompt_tokens + c[2] * usage.completion_tokens
        for k, part in enumerate(self.parts, 3):
            total += c[k] * getattr(usage, part)
        return total


def compile_usage_price(
    price: GenaiModelPrice,
    parts: tuple[str, ...],
    exact_nanos: Callable[[GenaiModelPrice, Usage], Fraction],
) -> UsagePrice | None:
    """The price of usages whose nonzero parts are `parts`; None if it is not affine."""
    starts = tier_starts(price)
    pieces: list[tuple[Fraction, ...]] = []
    for k in range(len(starts) + 1):
        low = starts[k - 1] + 1 if k else 0
        high = starts[k] if k < len(starts) else None
        prompt = low + _PROBE * (len(parts) + 1)
        if high is not None and prompt + 2 * _PROBE * (len(parts) + 1) > high:
            return None  # a tier range too narrow to probe
        base = Usage(prompt, _PROBE * (len(parts) + 1))
        at_base = exact_nanos(price, base)
        per_prompt = exact_nanos(price, replace(base, prompt_tokens=prompt + 1)) - at_base
        per_completion = (
            exact_nanos(price, replace(base, completion_tokens=base.completion_tokens + 1))
            - at_base
        )
        per_part = [
            exact_nanos(price, replace(base, **{part: 1})) - at_base  # type: ignore[arg-type]
            for part in parts
        ]
        constant = at_base - per_prompt * prompt - per_completion * base.completion_tokens
        pieces.append((constant, per_prompt, per_completion, *per_part))
        # Checked with every part at once: just past the probes, and at the range's top.
        top = high if high is not None else low + _FAR
        near = replace(
            base,
            prompt_tokens=prompt + _PROBE * (len(parts) + 1),
            completion_tokens=base.completion_tokens * 2,
            **{part: 2 + i for i, part in enumerate(parts)},  # type: ignore[arg-type]
        )
        output = 654_321 * (len(parts) + 1)
        share = min(top, output) // (len(parts) + 1)  # parts within both wholes
        far = replace(
            base,
            prompt_tokens=top,
            completion_tokens=output,
            **{part: share - i for i, part in enumerate(parts)},  # type: ignore[arg-type]
        )
        for check in (near, far):
            got = (
                constant
                + per_prompt * check.prompt_tokens
                + per_completion * check.completion_tokens
                + sum(c * getattr(check, part) for c, part in zip(per_part, parts, strict=True))
            )
            if got != exact_nanos(price, check):
                return None
    denom = lcm(*(c.denominator for piece in pieces for c in piece))
    segments = tuple(
        tuple(c.numerator * (denom // c.denominator) for c in piece) for piece in pieces
    )
    return UsagePrice(parts, tuple(starts), segments, denom)
