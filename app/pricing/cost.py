"""A request's cost: its upper bound before forwarding, and its actual cost after (SPEC 4)."""

from __future__ import annotations

import logging
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING

from app.errors import BadRequest
from app.pricing.money import dollars_to_nanos
from app.pricing.prices import PriceBook

if TYPE_CHECKING:
    from app.proxy.request import MeteredRequest

log = logging.getLogger("budgetgate.pricing")

COST_HEADER = "x-litellm-response-cost"
_NANO = Decimal("1e-9")


class CostCalculator:
    def __init__(self, book: PriceBook, unpriced_model: str, trust_upstream_cost: bool) -> None:
        self.book = book
        self.reject_unpriced = unpriced_model == "reject"
        self.trust_upstream_cost = trust_upstream_cost

    def estimate(self, model: str, input_tokens: int, output_tokens: int) -> int:
        """Upper bound of a request's cost (nano-dollars), with the same price function as the
        charge; 0 for an unpriced model let through by BUDGETGATE_UNPRICED_MODEL=free."""
        amount = self.book.estimate(model, input_tokens, output_tokens)
        if amount is not None:
            return amount
        if self.reject_unpriced:
            raise BadRequest(
                f"model '{model}' has no known price, so its cost cannot be bounded; add it to "
                "the prices file (BUDGETGATE_PRICES_FILE) or set BUDGETGATE_UNPRICED_MODEL=free",
                param="model",
                code="model_not_priced",
            )
        return 0

    def bound(self, metered: MeteredRequest) -> int:
        """Upper bound of a metered request's cost (nano-dollars)."""
        return self.estimate(metered.model, metered.input_bound, metered.output_bound)

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

    def from_usage(
        self, models: list[str | None], input_tokens: int, output_tokens: int
    ) -> int | None:
        priced = self.book.cost(models, input_tokens, output_tokens)
        return None if priced is None else priced[0]

    def charge(
        self,
        header: str | None,
        models: list[str | None],
        usage: tuple[int, int] | None,
        fallback: tuple[int, int],
    ) -> tuple[int, str]:
        """Cost and its source, in SPEC order: upstream header, usage x price, estimate from
        what was forwarded (`fallback` tokens); `free` for an unpriced model."""
        from_header = self.from_header(header)
        if from_header is not None:
            return from_header, "upstream"
        tokens, source = (usage, "prices") if usage is not None else (fallback, "estimated")
        cost = self.from_usage(models, *tokens)
        if cost is None:
            return 0, "free"
        return cost, source
