"""The price book: which model costs what, from the operator's prices file and genai-prices.

Prices file (YAML or JSON)::

    models:
      my-model:                  # model name as clients send it
        input_per_million: 1.0   # dollars per 1M input tokens
        output_per_million: 2.0  # dollars per 1M output tokens
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

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from app.pricing import genai
from app.pricing.pricers import Affine, Pricer

__all__ = ["ModelPrice", "PriceBook", "PricesFileError"]

RESOLVE_CACHE_SIZE = 4096

_TOP_LEVEL_KEYS = frozenset({"models", "aliases"})
_MODEL_KEYS = ("input_per_million", "output_per_million")


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


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Dollars per one million input / output tokens (stored as exact Decimals)."""

    input_per_million: Decimal
    output_per_million: Decimal

    def __post_init__(self) -> None:
        for field in _MODEL_KEYS:
            try:
                object.__setattr__(self, field, _parse_price(getattr(self, field)))
            except ValueError as e:
                raise ValueError(f"{field} {e}") from None

    def pricer(self) -> Affine:
        return Affine.per_million(self.input_per_million, self.output_per_million)


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
        extra = [str(k) for k in entry if k not in _MODEL_KEYS]
        if extra:
            raise fail(
                where,
                f"unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(_MODEL_KEYS)}",
            )
        values: dict[str, Decimal] = {}
        for key in _MODEL_KEYS:
            if key not in entry:
                raise fail(where, f"missing {key}")
            try:
                values[key] = _parse_price(entry[key])
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
            if self._resolve_target(target) is None:
                raise ValueError(
                    f"aliases.{alias}: target {target!r} is not priced "
                    "(not in models"
                    + (" nor known to genai-prices)" if self.use_genai_prices else ")")
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

    def _file_lookup(self, name: str) -> Pricer | None:
        pricer = self._file_pricers.get(name)
        if pricer is None and (split := genai.split_provider_prefix(name)) is not None:
            pricer = self._file_pricers.get(split[1])
        return pricer

    def _resolve_target(self, name: str) -> Pricer | None:
        """File models, then genai-prices; no aliases."""
        pricer = self._file_lookup(name)
        if pricer is None and self.use_genai_prices:
            pricer = genai.lookup(name)
        return pricer

    def _resolve_uncached(self, name: str) -> Pricer | None:
        pricer = self._file_lookup(name)
        if pricer is not None:
            return pricer
        target = self._aliases.get(name)
        if target is None and (split := genai.split_provider_prefix(name)) is not None:
            target = self._aliases.get(split[1])
        if target is not None:
            return self._resolve_target(target)
        return genai.lookup(name) if self.use_genai_prices else None

    def _pricer(self, model: str) -> Pricer | None:
        if self.use_genai_prices:
            snapshot = genai.current_snapshot()
            if snapshot is not self._snapshot:  # genai-prices loaded new data: re-resolve
                self._resolve.cache_clear()
                self._snapshot = snapshot
        return self._resolve(model)

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
