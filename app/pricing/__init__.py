"""Model pricing: integer nano-dollar money and the PriceBook (prices file + genai-prices)."""

from app.pricing.money import NANOS_PER_DOLLAR, dollars_to_nanos, nanos_to_dollars
from app.pricing.prices import ModelPrice, PriceBook, PricesFileError

__all__ = [
    "NANOS_PER_DOLLAR",
    "ModelPrice",
    "PriceBook",
    "PricesFileError",
    "dollars_to_nanos",
    "nanos_to_dollars",
]
