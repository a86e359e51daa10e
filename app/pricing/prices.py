"""The price book: which model costs what, from the operator's prices file and genai-prices.

Prices file (YAML or JSON)::

    models:
      my-model:                  # model name as clients send it
        input_per_million: 1.0   # dollars per 1M input tokens
        output_per_million: 2.0  # dollars per 1M output tokens
        # optional (SPEC 10; see the README's "What the cap guarantees"):
        cache_read_per_million: 0.1       # cached input read
        cache_write_per_million: 1.25     # cache write (5-minute, or the only one)
        cache_write_1h_per_million: 2.0   # 1-hour cache write
        input_audio_per_million: 40       # audio input / output tokens
        output_audio_per_million: 80
        reasoning_per_million: 2.0        # reasoning output, when not the output price
        tool_call_fee: 0.01               # dollars per fee-bearing tool call (web search, ...)
        per_million_characters: 15        # text-to-speech input
        per_image: {"1024x1024/high": 0.167, "1024x1024/low": 0.011}  # or one number
        context_window: 128000            # tokens; overrides genai-prices
        max_tokens_per_image: 1445        # proven input bound of one image part
        answers_as: [gpt-4o-mini, gpt-4o] # models a router may answer this name with
    aliases:
      team-gpt: gpt-4o           # priced as gpt-4o

Resolution of a model name (first hit wins):

1. the file's ``models``: the full name, then the name without a LiteLLM provider prefix
   (``openai/my-model`` -> ``my-model``);
2. ``aliases`` (full name, then without prefix), applied once: the target is resolved through
   the file's models and genai-prices, never through aliases again;
3. genai-prices (unless disabled): with the prefix mapped to a genai-prices provider id, then
   without a provider (and, for unprefixed names, with provider ``openai``).

Resolutions (including misses) are cached in a bounded LRU per PriceBook.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from genai_prices.types import ModelInfo, Provider
from genai_prices.types import ModelPrice as GenaiModelPrice

from app.pricing import genai
from app.pricing.pricers import Affine, Pricer

__all__ = [
    "DEAREST_IMAGE",
    "ModelPrice",
    "ModelProfile",
    "PriceBook",
    "PricesFileError",
    "known_image_prices",
]

RESOLVE_CACHE_SIZE = 4096

_TOP_LEVEL_KEYS = frozenset({"models", "aliases"})
_MODEL_KEYS = ("input_per_million", "output_per_million")
# Optional per-token prices, and the genai-prices price key each one becomes.
_OPTIONAL_RATES: dict[str, str] = {
    "cache_read_per_million": "cache_read_mtok",
    "cache_write_per_million": "cache_write_mtok",
    "cache_write_1h_per_million": "cache_write_1h_mtok",
    "input_audio_per_million": "input_audio_mtok",
    "output_audio_per_million": "output_audio_mtok",
    "reasoning_per_million": "output_reasoning_mtok",
    "per_million_characters": "input_mchars",
}
_CACHED_AUDIO = {
    "cache_read_mtok": "cache_audio_read_mtok",
    "cache_write_mtok": "cache_audio_write_mtok",
    "cache_write_1h_mtok": "cache_audio_write_1h_mtok",
}
_OPTIONAL_COUNTS = ("context_window", "max_tokens_per_image")
_OPTIONAL_KEYS = (
    *_OPTIONAL_RATES,
    "tool_call_fee",
    *_OPTIONAL_COUNTS,
    "per_image",
    "answers_as",
)
_ALL_MODEL_KEYS = (*_MODEL_KEYS, *_OPTIONAL_KEYS)


class PricesFileError(ValueError):
    """The prices file cannot be used; the message names the file and the offending entry."""


def _parse_price(value: object) -> Decimal:
    """A dollar price from a file or caller: int, float, str or Decimal; finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"must be a number, got {type(value).__name__} {value!r}")
    try:
        # str() first so a YAML/JSON float 0.1 becomes Decimal("0.1"), not its binary value
        price = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"must be a number, got {value!r}") from None
    if not price.is_finite():
        raise ValueError(f"must be a finite number, got {value!r}")
    if price < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return price


def _parse_count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def _parse_per_image(value: object) -> Mapping[str, Decimal]:
    """One price for every image, or prices by "SIZE/QUALITY", "SIZE" or "QUALITY"."""
    if not isinstance(value, dict):
        return MappingProxyType({"": _parse_price(value)})
    if not value:
        raise ValueError("must not be empty")
    prices: dict[str, Decimal] = {}
    for key, price in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"keys must be 'SIZE/QUALITY', 'SIZE' or 'QUALITY', got {key!r}")
        prices[key.lower()] = _parse_price(price)
    return MappingProxyType(prices)


def _parse_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a list of model names, got {value!r}")
    return tuple(value)


def _parse_field(field: str, value: object) -> Any:
    if field in _OPTIONAL_COUNTS:
        return _parse_count(value)
    if field == "per_image":
        return value if isinstance(value, MappingProxyType) else _parse_per_image(value)
    if field == "answers_as":
        return _parse_names(value)
    return _parse_price(value)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A prices file entry: dollars per one million input / output tokens (exact Decimals),
    and the optional prices and limits of SPEC 10."""

    input_per_million: Decimal
    output_per_million: Decimal
    cache_read_per_million: Decimal | None = None
    cache_write_per_million: Decimal | None = None
    cache_write_1h_per_million: Decimal | None = None
    input_audio_per_million: Decimal | None = None
    output_audio_per_million: Decimal | None = None
    reasoning_per_million: Decimal | None = None
    per_million_characters: Decimal | None = None
    tool_call_fee: Decimal | None = None
    context_window: int | None = None
    max_tokens_per_image: int | None = None
    per_image: Mapping[str, Decimal] | None = None
    answers_as: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in _ALL_MODEL_KEYS:
            value = getattr(self, name)
            if value is None or value == ():
                continue
            try:
                object.__setattr__(self, name, _parse_field(name, value))
            except ValueError as e:
                raise ValueError(f"{name} {e}") from None

    def pricer(self) -> Affine:
        return Affine.per_million(self.input_per_million, self.output_per_million)

    def genai_price(self) -> GenaiModelPrice:
        """The same prices as a genai-prices ModelPrice, so that usage by category is priced
        by genai-prices' own calculation for file models too."""
        keys: dict[str, Decimal | None] = {
            "input_mtok": self.input_per_million,
            "output_mtok": self.output_per_million,
        }
        for name, key in _OPTIONAL_RATES.items():
            keys[key] = getattr(self, name)
        audio = self.input_audio_per_million
        if audio is not None:
            # genai-prices needs the price of cached audio once both are priced; the file does
            # not give it, so it is the dearer of the two.
            for cache, cached_audio in _CACHED_AUDIO.items():
                if (rate := keys[cache]) is not None:
                    keys[cached_audio] = max(audio, rate)
        return GenaiModelPrice(**{k: v for k, v in keys.items() if v is not None})


# --- loading ---------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads floats as exact Decimals."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


def _construct_float(loader: _StrictLoader, node: yaml.ScalarNode) -> Decimal | float:
    text = str(loader.construct_scalar(node)).replace("_", "").strip()
    if ":" in text or text.lower().lstrip("+-") in (".inf", ".nan"):
        return loader.construct_yaml_float(node)  # sexagesimal / inf / nan: validated later
    return Decimal(text)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _json_constant(name: str) -> float:
    return math.nan if name == "NaN" else float(name)  # rejected later as "must be finite"


def _read_document(path: str) -> object:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PricesFileError(f"{path}: cannot read prices file: {reason}") from None
    if Path(path).suffix.lower() == ".json":
        try:
            return json.loads(
                text,
                parse_float=Decimal,
                parse_constant=_json_constant,
                object_pairs_hook=_json_object,
            )
        except ValueError as e:  # JSONDecodeError is a ValueError, so is the duplicate check
            raise PricesFileError(f"{path}: invalid JSON: {e}") from None
    # .yaml, .yml, and anything else: YAML (a superset of JSON)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as e:
        raise PricesFileError(f"{path}: invalid YAML: {e}") from None


def _parse_document(doc: object, path: str) -> tuple[dict[str, ModelPrice], dict[str, str]]:
    def fail(where: str, problem: str) -> PricesFileError:
        return PricesFileError(f"{path}: {where}: {problem}")

    if doc is None:
        raise fail("top level", "file is empty; expected a mapping with 'models' and/or 'aliases'")
    if not isinstance(doc, dict):
        raise fail("top level", f"expected a mapping, got {type(doc).__name__}")
    unknown = [str(k) for k in doc if k not in _TOP_LEVEL_KEYS]
    if unknown:
        raise fail(
            "top level",
            f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: 'models', 'aliases'",
        )

    raw_models = doc.get("models") or {}
    if not isinstance(raw_models, dict):
        raise fail(
            "models", f"expected a mapping of model name -> prices, got {type(raw_models).__name__}"
        )
    models: dict[str, ModelPrice] = {}
    for name, entry in raw_models.items():
        if not isinstance(name, str) or not name:
            raise fail(f"models.{name!r}", "model name must be a non-empty string (quote it)")
        where = f"models.{name}"
        if not isinstance(entry, dict):
            raise fail(where, f"expected a mapping with {' and '.join(_MODEL_KEYS)}, got {entry!r}")
        extra = [str(k) for k in entry if k not in _ALL_MODEL_KEYS]
        if extra:
            raise fail(
                where,
                f"unknown key(s) {', '.join(map(repr, extra))}; "
                f"allowed: {', '.join(_ALL_MODEL_KEYS)}",
            )
        for key in _MODEL_KEYS:
            if key not in entry:
                raise fail(where, f"missing {key}")
        values: dict[str, Any] = {}
        for key in _ALL_MODEL_KEYS:
            if key not in entry:
                continue
            try:
                values[key] = _parse_field(key, entry[key])
            except ValueError as e:
                raise fail(f"{where}.{key}", str(e)) from None
        models[name] = ModelPrice(**values)

    raw_aliases = doc.get("aliases") or {}
    if not isinstance(raw_aliases, dict):
        raise fail(
            "aliases",
            f"expected a mapping of alias -> model name, got {type(raw_aliases).__name__}",
        )
    aliases: dict[str, str] = {}
    for alias, target in raw_aliases.items():
        if not isinstance(alias, str) or not alias:
            raise fail(f"aliases.{alias!r}", "alias must be a non-empty string (quote it)")
        if not isinstance(target, str) or not target:
            raise fail(f"aliases.{alias}", f"target must be a model name string, got {target!r}")
        aliases[alias] = target
    return models, aliases


# Per-image prices of image models genai-prices does not price per image (BILLING-RULES: LiteLLM's
# table, 1024x1024 and 1024x1536; the larger of the two sizes also for other sizes). Only models
# whose every quality is known: another (gpt-image-1-mini: no sourced "high") needs `per_image`
# in the prices file, or its requests cannot be bounded.
_KNOWN_IMAGE_PRICES: dict[str, dict[str, str]] = {
    "gpt-image-1": {
        "1024x1024/low": "0.011", "1024x1024/medium": "0.042", "1024x1024/high": "0.167",
        "low": "0.016", "medium": "0.063", "high": "0.25",
    },
    "gpt-image-1.5": {
        "1024x1024/low": "0.009", "1024x1024/medium": "0.034", "1024x1024/high": "0.133",
        "low": "0.013", "medium": "0.05", "high": "0.2",
    },
}  # fmt: skip


# What one generated image can cost at most, when nothing says which model, size and quality
# made it (the image_generation tool of /v1/responses).
DEAREST_IMAGE = max(Decimal(v) for table in _KNOWN_IMAGE_PRICES.values() for v in table.values())


def known_image_prices(name: str) -> Mapping[str, Decimal]:
    split = genai.split_provider_prefix(name)
    table = _KNOWN_IMAGE_PRICES.get((split[1] if split else name).lower(), {})
    return MappingProxyType({k: Decimal(v) for k, v in table.items()})


@dataclass(frozen=True, slots=True, eq=False)
class ModelProfile:
    """What the book knows of one model: its price function for plain usage (None when it is
    not priced per token), every price it can be billed at, and its limits."""

    pricer: Pricer | None
    prices: tuple[GenaiModelPrice, ...]  # every conditional price (a bound takes their max)
    current: Callable[[], GenaiModelPrice]  # the price that applies now (charges)
    context_window: int | None
    max_tokens_per_image: int | None
    tool_call_fee: Decimal | None  # dollars per fee-bearing tool call, when the file says
    per_image: Mapping[str, Decimal]
    answers_as: tuple[str, ...]
    # The bound's compiled rates, by kind of request (filled by app/pricing/bounds.py).
    bound_rates: dict[Any, Any] = field(default_factory=dict)


# --- the book --------------------------------------------------------------------------------


def _check_tokens(input_tokens: int, output_tokens: int) -> None:
    if not (isinstance(input_tokens, int) and isinstance(output_tokens, int)):
        raise TypeError("token counts must be ints")
    if input_tokens < 0 or output_tokens < 0:
        raise ValueError(f"token counts must not be negative: {input_tokens}, {output_tokens}")


class PriceBook:
    """Model prices from a prices file, falling back to the genai-prices package."""

    def __init__(
        self,
        models: dict[str, ModelPrice] | None = None,
        aliases: dict[str, str] | None = None,
        use_genai_prices: bool = True,
    ) -> None:
        self._models: dict[str, ModelPrice] = dict(models or {})
        self._aliases: dict[str, str] = dict(aliases or {})
        self._file_pricers: dict[str, Affine] = {n: p.pricer() for n, p in self._models.items()}
        self.use_genai_prices = use_genai_prices
        self._validate_aliases()
        self._validate_answers_as()
        self._snapshot = genai.current_snapshot() if use_genai_prices else None
        # per-instance bounded cache of name -> price function (None = unpriced)
        self._resolve = lru_cache(maxsize=RESOLVE_CACHE_SIZE)(self._resolve_uncached)

    @property
    def models(self) -> Mapping[str, ModelPrice]:
        return MappingProxyType(self._models)

    @property
    def aliases(self) -> Mapping[str, str]:
        return MappingProxyType(self._aliases)

    def _validate_aliases(self) -> None:
        for alias, target in self._aliases.items():
            if alias in self._models:
                raise ValueError(f"aliases.{alias}: {alias!r} is also defined under models")
            if target in self._aliases:
                raise ValueError(
                    f"aliases.{alias}: target {target!r} is itself an alias "
                    "(aliases are applied once)"
                )
            found = self._resolve_target(target)
            if found is None or found.pricer is None:
                raise ValueError(
                    f"aliases.{alias}: target {target!r} is not priced "
                    "(not in models"
                    + (" nor known to genai-prices)" if self.use_genai_prices else ")")
                )

    def _validate_answers_as(self) -> None:
        for name, entry in self._models.items():
            for other in entry.answers_as:
                if self._resolve_uncached(other) is None:
                    raise ValueError(
                        f"models.{name}.answers_as: {other!r} is not priced, so what it costs "
                        "cannot be bounded"
                    )

    @classmethod
    def load(cls, path: str | None) -> PriceBook:
        """Load a prices file (.yaml/.yml/.json; other names are read as YAML).

        ``None`` gives an empty book that prices through genai-prices only.
        Raises PricesFileError naming the file and the offending entry.
        """
        if path is None:
            return cls()
        models, aliases = _parse_document(_read_document(path), path)
        try:
            return cls(models, aliases)
        except ValueError as e:
            raise PricesFileError(f"{path}: {e}") from None

    # resolution --------------------------------------------------------------------------

    def _file_lookup(self, name: str) -> ModelPrice | None:
        entry = self._models.get(name)
        if entry is None and (split := genai.split_provider_prefix(name)) is not None:
            entry = self._models.get(split[1])
        return entry

    def _genai_model(self, name: str) -> tuple[Provider, ModelInfo] | None:
        return genai.lookup_model(name) if self.use_genai_prices else None

    def _file_profile(self, name: str, entry: ModelPrice) -> ModelProfile:
        price = entry.genai_price()
        context_window = entry.context_window
        if context_window is None and (found := self._genai_model(name)) is not None:
            context_window = found[1].context_window
        return ModelProfile(
            pricer=self._file_pricers[name] if name in self._file_pricers else entry.pricer(),
            prices=(price,),
            current=lambda: price,
            context_window=context_window,
            max_tokens_per_image=entry.max_tokens_per_image,
            tool_call_fee=entry.tool_call_fee,
            per_image=entry.per_image or known_image_prices(name),
            answers_as=entry.answers_as,
        )

    def _resolve_target(self, name: str) -> ModelProfile | None:
        """File models, then genai-prices; no aliases."""
        entry = self._file_lookup(name)
        if entry is not None:
            return self._file_profile(name, entry)
        found = self._genai_model(name)
        if found is None:
            return None
        provider, model = found
        return ModelProfile(
            pricer=genai.pricer_for(provider, model),
            prices=genai.all_prices(model),
            current=functools.partial(genai.current_price, model),
            context_window=model.context_window,
            max_tokens_per_image=None,
            tool_call_fee=None,
            per_image=known_image_prices(name),
            answers_as=(),
        )

    def _resolve_uncached(self, name: str) -> ModelProfile | None:
        target = None
        if self._file_lookup(name) is None:
            target = self._aliases.get(name)
            if target is None and (split := genai.split_provider_prefix(name)) is not None:
                target = self._aliases.get(split[1])
        return self._resolve_target(target or name)

    def profile(self, model: str) -> ModelProfile | None:
        """Everything the book knows of a model name (None: nothing)."""
        if not model:
            return None
        if self.use_genai_prices:
            snapshot = genai.current_snapshot()
            if snapshot is not self._snapshot:  # genai-prices loaded new data: re-resolve
                self._resolve.cache_clear()
                self._snapshot = snapshot
        return self._resolve(model)

    def _pricer(self, model: str) -> Pricer | None:
        found = self.profile(model)
        return None if found is None else found.pricer

    # public API ----------------------------------------------------------------------------

    def is_priced(self, model: str) -> bool:
        return bool(model) and self._pricer(model) is not None

    def cost(
        self, models: Sequence[str | None], input_tokens: int, output_tokens: int
    ) -> tuple[int, str] | None:
        """Nano-dollars for the usage and the model name that priced it.

        Tries each candidate in order (the gateway passes ``[response_model, request_model]``);
        None when none is priced.
        """
        _check_tokens(input_tokens, output_tokens)
        for model in models:
            if not model:
                continue
            pricer = self._pricer(model)
            if pricer is not None:
                return pricer(input_tokens, output_tokens), model
        return None

    def estimate(self, model: str, input_tokens: int, output_tokens: int) -> int | None:
        """Nano-dollars for a (prospective) usage of one model; None when unpriced."""
        _check_tokens(input_tokens, output_tokens)
        if not model:
            return None
        pricer = self._pricer(model)
        return None if pricer is None else pricer(input_tokens, output_tokens)

    def __repr__(self) -> str:
        return (
            f"PriceBook(models={len(self._models)}, aliases={len(self._aliases)}, "
            f"use_genai_prices={self.use_genai_prices})"
        )
