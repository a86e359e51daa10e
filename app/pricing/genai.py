"""Adapter over the ``genai-prices`` package: model lookup and compiled price functions.

``genai_prices.calc_price`` costs ~60 µs per call (it re-derives units, validates and
decomposes usage every time) and its snapshot caches every distinct model name it is asked
about, without bound. So instead of calling it per request we:

* look the model up once (mirroring ``DataSnapshot.find_provider_model``, without its
  unbounded caches; the PriceBook caches the result in a bounded LRU), and
* compile each of the model's ``ModelPrice`` objects into integer price functions by probing
  genai-prices' own ``ModelPrice.calc_price`` at a few token counts. For the usage we price
  (input + output tokens only) the price is affine in the token counts except at tier
  thresholds (genai-prices' "cliff" tiers, keyed on total input tokens), so one affine piece
  per tier range reproduces it exactly. Every piece is verified against ``calc_price`` at
  extra points; if anything disagrees the model falls back to calling ``calc_price``.

Conditional prices (price changes from a start date, DeepSeek's time-of-day discounts) are
still selected per request with ``ModelInfo.get_prices(now)``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

from genai_prices import Usage, data_snapshot
from genai_prices.types import ModelInfo, Provider, TieredPrices
from genai_prices.types import ModelPrice as GenaiModelPrice

from app.pricing.money import dollars_to_nanos
from app.pricing.pricers import Affine, Pricer, Segmented

__all__ = [
    "LITELLM_PROVIDERS",
    "LITELLM_TO_GENAI_PROVIDER",
    "GenaiModelPricer",
    "compile_model_price",
    "current_snapshot",
    "find_model",
    "genai_provider_id",
    "all_prices",
    "current_price",
    "lookup",
    "lookup_model",
    "pricer_for",
    "split_provider_prefix",
    "tier_starts",
]

log = logging.getLogger(__name__)

# LiteLLM provider prefix -> genai-prices provider id, where genai-prices has the provider.
LITELLM_TO_GENAI_PROVIDER: dict[str, str] = {
    "openai": "openai",
    "text-completion-openai": "openai",
    "azure": "azure",  # genai-prices' azure falls back to openai/anthropic/deepseek/x-ai models
    "azure_text": "azure",
    "azure_ai": "azure",
    "anthropic": "anthropic",
    "anthropic_text": "anthropic",
    "bedrock": "aws",
    "vertex_ai": "google",
    "vertex_ai_beta": "google",
    "gemini": "google",
    "mistral": "mistral",
    "codestral": "mistral",
    "text-completion-codestral": "mistral",
    "groq": "groq",
    "deepseek": "deepseek",
    "xai": "x-ai",
    "cohere": "cohere",
    "cohere_chat": "cohere",
    "together_ai": "together",
    "fireworks_ai": "fireworks",
    "openrouter": "openrouter",
    "perplexity": "perplexity",
    "cerebras": "cerebras",
    "databricks": "databricks",
    "cloudflare": "cloudflare",
    "novita": "novita",
    "voyage": "voyageai",
    "moonshot": "moonshotai",
    "github_copilot": "github-copilot",
    "meta_llama": "meta",
    "minimax": "minimax",
    "ovhcloud": "ovhcloud",
    "zai": "zai",
    "elevenlabs": "elevenlabs",
    "baseten": "baseten",
}

# Every LiteLLM provider prefix we strip ("ollama/llama3" -> "llama3"). Prefixes without a
# genai-prices provider are still stripped; genai-prices is then asked without a provider.
LITELLM_PROVIDERS: frozenset[str] = frozenset(LITELLM_TO_GENAI_PROVIDER) | {
    "custom_openai",
    "openai_like",
    "litellm_proxy",
    "hosted_vllm",
    "vllm",
    "ollama",
    "ollama_chat",
    "lm_studio",
    "llamafile",
    "huggingface",
    "replicate",
    "deepinfra",
    "sagemaker",
    "sagemaker_chat",
    "nvidia_nim",
    "watsonx",
    "watsonx_text",
    "ai21",
    "ai21_chat",
    "sambanova",
    "nebius",
    "hyperbolic",
    "lambda_ai",
    "nscale",
    "featherless_ai",
    "friendliai",
    "dashscope",
    "volcengine",
    "snowflake",
    "predibase",
    "triton",
    "clarifai",
    "xinference",
    "infinity",
    "jina_ai",
    "github",
    "oci",
    "heroku",
    "v0",
    "vercel_ai_gateway",
    "wandb",
    "datarobot",
}

# Route segments LiteLLM allows after "bedrock/", e.g. "bedrock/converse/<model id>".
_BEDROCK_ROUTES = ("converse/", "invoke/", "converse_like/")

_PROBE_OUTPUT_TOKENS = (0, 1, 654_321)
_UNBOUNDED_PROBE_INPUT = 12_345_678


def split_provider_prefix(name: str) -> tuple[str, str] | None:
    """``"openai/gpt-4o"`` -> ``("openai", "gpt-4o")``; None when there is no LiteLLM prefix."""
    prefix, sep, rest = name.partition("/")
    prefix = prefix.lower()
    if not sep or not rest or prefix not in LITELLM_PROVIDERS:
        return None
    if prefix == "bedrock":
        for route in _BEDROCK_ROUTES:
            if rest.startswith(route) and len(rest) > len(route):
                rest = rest[len(route) :]
                break
    return prefix, rest


def current_snapshot() -> data_snapshot.DataSnapshot:
    """The price data genai-prices is using (changes if ``UpdatePrices`` installs new data)."""
    return data_snapshot.get_snapshot()


def genai_provider_id(litellm_prefix: str, providers: list[Provider]) -> str | None:
    """The genai-prices provider id for a LiteLLM provider prefix, if genai-prices has it."""
    provider_id = LITELLM_TO_GENAI_PROVIDER.get(litellm_prefix, litellm_prefix)
    if any(p.id == provider_id for p in providers):
        return provider_id
    return None


def find_model(
    providers: list[Provider], model_ref: str, provider_id: str | None
) -> tuple[Provider, ModelInfo] | None:
    """Same matching as ``DataSnapshot.find_provider_model``, but without its unbounded caches."""
    ref = model_ref.lower()
    provider: Provider | None
    if provider_id is not None:
        provider = next((p for p in providers if p.id == provider_id), None)
    else:
        provider = next(
            (p for p in providers if p.model_match is not None and p.model_match.is_match(ref)),
            None,
        )
    if provider is None:
        return None
    model = provider.find_model(ref, all_providers=providers)
    return None if model is None else (provider, model)


def _dollars(price: GenaiModelPrice, input_tokens: int, output_tokens: int) -> Decimal:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return price.calc_price(usage)["total_price"]


class _CalcPricePricer:
    """Fallback: ask genai-prices on every call (only if compiling did not verify)."""

    __slots__ = ("price",)

    def __init__(self, price: GenaiModelPrice) -> None:
        self.price = price

    def __call__(self, input_tokens: int, output_tokens: int) -> int:
        return dollars_to_nanos(_dollars(self.price, input_tokens, output_tokens))


def tier_starts(price: GenaiModelPrice) -> list[int]:
    """Where the price's long-context tiers start (a tier applies past its start), sorted."""
    starts = {
        tier.start
        for value in vars(price).values()
        if isinstance(value, TieredPrices)
        for tier in value.tiers
    }
    return sorted(starts)


def compile_model_price(price: GenaiModelPrice) -> Pricer:
    """Compile one genai-prices ``ModelPrice`` into an integer price function (see module doc)."""
    thresholds = tier_starts(price)
    segments: list[Affine] = []
    for k in range(len(thresholds) + 1):
        lo = 0 if k == 0 else thresholds[k - 1] + 1  # smallest input count in this tier range
        hi = thresholds[k] if k < len(thresholds) else None  # largest, inclusive
        at_lo = _dollars(price, lo, 0)
        wide = hi is None or hi > lo
        per_input = _dollars(price, lo + 1, 0) - at_lo if wide else Decimal(0)
        per_output = _dollars(price, lo, 1) - at_lo
        base = Fraction(at_lo) - lo * Fraction(per_input)
        if base < 0 or per_input < 0 or per_output < 0:
            return _CalcPricePricer(price)
        segment = Affine.from_dollars(base, per_input, per_output)
        top = hi if hi is not None else lo + _UNBOUNDED_PROBE_INPUT
        for input_tokens in sorted({lo, min(lo + 1, top), top}):
            for output_tokens in _PROBE_OUTPUT_TOKENS:
                expected = Fraction(_dollars(price, input_tokens, output_tokens)) * 1_000_000_000
                if segment.exact_nanos(input_tokens, output_tokens) != expected:
                    log.warning("genai price did not compile to an affine function: %r", price)
                    return _CalcPricePricer(price)
        segments.append(segment)
    return segments[0] if not thresholds else Segmented(thresholds, segments)


def _utcnow() -> datetime:
    return datetime.now(tz=UTC)


def _prices_tokens(price: GenaiModelPrice) -> bool:
    """Whether this price can price token usage.

    A price with no keys at all is genai-prices' way of saying "free" (``:free`` models,
    subscription-included models): priced at $0. Models priced only per audio hour,
    character, page... would also come out at $0 for tokens; those are treated as unpriced
    rather than free.
    """
    keys = {k for k, v in vars(price).items() if v is not None and not k.startswith("_")}
    return not keys or bool(keys & {"input_mtok", "output_mtok"})


class GenaiModelPricer:
    """Price function for one genai-prices model; selects conditional prices per call."""

    __slots__ = ("model", "provider_id", "_fixed", "_by_price")

    def __init__(self, provider: Provider, model: ModelInfo) -> None:
        self.model = model
        self.provider_id = provider.id
        self._fixed: Pricer | None = None
        self._by_price: dict[int, tuple[GenaiModelPrice, Pricer]] = {}
        if isinstance(model.prices, GenaiModelPrice):
            prices = [model.prices]
        else:
            prices = [conditional.prices for conditional in model.prices]
        if not prices or not all(_prices_tokens(p) for p in prices):
            raise LookupError(f"{provider.id}/{model.id} is not priced per token")
        if isinstance(model.prices, GenaiModelPrice):
            self._fixed = compile_model_price(model.prices)
        else:
            # keyed by identity: get_prices() returns these very objects (no price context)
            self._by_price = {id(p): (p, compile_model_price(p)) for p in prices}

    def __call__(self, input_tokens: int, output_tokens: int) -> int:
        if self._fixed is not None:
            return self._fixed(input_tokens, output_tokens)
        price = self.model.get_prices(_utcnow())
        entry = self._by_price.get(id(price))
        pricer = entry[1] if entry is not None and entry[0] is price else _CalcPricePricer(price)
        return pricer(input_tokens, output_tokens)

    def __repr__(self) -> str:
        return f"GenaiModelPricer({self.provider_id}/{self.model.id})"


def _attempts(name: str, providers: list[Provider]) -> list[tuple[str, str | None]]:
    split = split_provider_prefix(name)
    if split is None:
        # Unprefixed names are usually OpenAI-style; some OpenAI models (embeddings) are only
        # found when the provider is given.
        return [(name, None), (name, "openai")]
    prefix, bare = split
    attempts: list[tuple[str, str | None]] = []
    provider_id = genai_provider_id(prefix, providers)
    if provider_id is not None:
        attempts.append((bare, provider_id))
    attempts.append((bare, None))
    attempts.append((name, None))
    return attempts


def lookup_model(
    name: str, snapshot: data_snapshot.DataSnapshot | None = None
) -> tuple[Provider, ModelInfo] | None:
    """The genai-prices provider and model for a model name, priced per token or not."""
    providers = (snapshot or current_snapshot()).providers
    for model_ref, provider_id in _attempts(name, providers):
        found = find_model(providers, model_ref, provider_id)
        if found is not None:
            return found
    return None


def pricer_for(provider: Provider, model: ModelInfo) -> Pricer | None:
    """The compiled price function of a genai-prices model; None unless priced per token."""
    try:
        return GenaiModelPricer(provider, model)
    except LookupError:
        return None  # known, but not priced per token
    except (ValueError, ArithmeticError):
        log.warning("cannot use genai-prices price for %s/%s", provider.id, model.id)
        return None


def lookup(name: str, snapshot: data_snapshot.DataSnapshot | None = None) -> Pricer | None:
    """Resolve a model name through genai-prices; None when it does not know the model."""
    found = lookup_model(name, snapshot)
    return None if found is None else pricer_for(*found)


def all_prices(model: ModelInfo) -> tuple[GenaiModelPrice, ...]:
    """Every price a model can be billed at (conditional prices: each of them)."""
    if isinstance(model.prices, GenaiModelPrice):
        return (model.prices,)
    return tuple(conditional.prices for conditional in model.prices)


def current_price(model: ModelInfo) -> GenaiModelPrice:
    return model.get_prices(_utcnow())
