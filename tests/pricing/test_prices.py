from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price
from genai_prices import data_snapshot as genai_snapshot
from genai_prices.types import ModelInfo, Provider
from hypothesis import given
from hypothesis import strategies as st

from app.pricing import (
    NANOS_PER_DOLLAR,
    ModelPrice,
    PriceBook,
    PricesFileError,
    dollars_to_nanos,
    nanos_to_dollars,
)
from app.pricing import genai as genai_adapter
from app.pricing.genai import (
    LITELLM_TO_GENAI_PROVIDER,
    GenaiModelPricer,
    split_provider_prefix,
)
from app.pricing.pricers import Affine, Segmented


def pricer_of(book: PriceBook, model: str) -> object:
    profile = book.profile(model)
    assert profile is not None, model
    return profile.pricer


def genai_nanos(
    model_ref: str, input_tokens: int, output_tokens: int, provider_id: str | None = None
) -> int:
    """What genai-prices' public API says, rounded up to nanos: the reference for our pricing."""
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    price = calc_price(usage, model_ref=model_ref, provider_id=provider_id).total_price
    return dollars_to_nanos(price)


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str], str]:
    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def book(write_file: Callable[[str, str], str]) -> PriceBook:
    return PriceBook.load(
        write_file(
            "prices.yaml",
            """
models:
  my-model:
    input_per_million: 1.0
    output_per_million: 2.0
  cheap-model:
    input_per_million: "0.1"
    output_per_million: 0.3
aliases:
  team-model: my-model
  team-gpt: gpt-4o
  team-azure: azure/gpt-4o
""",
        )
    )


# --- money ------------------------------------------------------------------------------------


def test_dollars_to_nanos_exact() -> None:
    assert NANOS_PER_DOLLAR == 1_000_000_000
    assert dollars_to_nanos("1.5") == 1_500_000_000
    assert dollars_to_nanos(Decimal("1.5")) == 1_500_000_000
    assert dollars_to_nanos(2) == 2_000_000_000
    assert dollars_to_nanos("0") == 0
    assert dollars_to_nanos("-0") == 0
    assert dollars_to_nanos("0.000000001") == 1
    assert dollars_to_nanos("0.1") == 100_000_000
    # far beyond the decimal context's 28 digits: still exact
    big = "123456789012345678901234567890.123456789"
    assert dollars_to_nanos(big) == 123456789012345678901234567890123456789


def test_dollars_to_nanos_rounds_up() -> None:
    assert dollars_to_nanos(Decimal("0.0000000001")) == 1
    assert dollars_to_nanos("0.0000000011") == 2
    assert dollars_to_nanos("1.0000000000000000000000000000000001") == 1_000_000_001
    assert dollars_to_nanos(Decimal("1E-30")) == 1


@pytest.mark.parametrize(
    "value", ["-1", Decimal("-0.000000001"), -1, "NaN", Decimal("sNaN"), "inf", "-Infinity", "x"]
)
def test_dollars_to_nanos_rejects(value: Decimal | str | int) -> None:
    with pytest.raises(ValueError):
        dollars_to_nanos(value)


@pytest.mark.parametrize("value", [0.1, True, None])
def test_dollars_to_nanos_refuses_floats_and_bools(value: object) -> None:
    with pytest.raises(TypeError):
        dollars_to_nanos(value)  # type: ignore[arg-type]


def test_nanos_to_dollars() -> None:
    assert nanos_to_dollars(1_500_000_000) == Decimal("1.5")
    assert nanos_to_dollars(1) == Decimal("0.000000001")
    assert nanos_to_dollars(-7) == Decimal("-0.000000007")
    huge = 10**40 + 1
    assert nanos_to_dollars(huge) == Decimal("10000000000000000000000000000000.000000001")
    with pytest.raises(TypeError):
        nanos_to_dollars(1.0)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=10**30))
def test_nanos_round_trip(n: int) -> None:
    assert dollars_to_nanos(nanos_to_dollars(n)) == n


@given(st.decimals(min_value=0, max_value=10**12, allow_nan=False, allow_infinity=False))
def test_dollars_to_nanos_is_ceiling(value: Decimal) -> None:
    nanos = dollars_to_nanos(value)
    exact = Fraction(value) * NANOS_PER_DOLLAR
    assert nanos - 1 < exact <= nanos


# --- file models ------------------------------------------------------------------------------


def test_file_model_exact_cost(book: PriceBook) -> None:
    # 1000 input @ $1/M + 500 output @ $2/M = $0.002
    assert book.cost(["my-model"], 1000, 500) == (2_000_000, "my-model")
    assert book.estimate("my-model", 1000, 500) == 2_000_000
    assert book.estimate("my-model", 0, 0) == 0
    assert book.is_priced("my-model")


def test_file_prices_stay_exact(book: PriceBook) -> None:
    # 0.1 and 0.3 from YAML (a string and a float) are exactly 0.1 and 0.3 dollars
    assert book.models["cheap-model"] == ModelPrice(Decimal("0.1"), Decimal("0.3"))
    # 10M input @ $0.1/M + 10M output @ $0.3/M = $4 exactly (floats would give 3.9999...)
    assert book.estimate("cheap-model", 10_000_000, 10_000_000) == 4 * NANOS_PER_DOLLAR


def test_file_cost_rounds_whole_charge_up() -> None:
    book = PriceBook(
        {"tiny": ModelPrice(Decimal("0.0001"), Decimal("0.0001"))}, use_genai_prices=False
    )
    # 1 token @ $0.0001/M = 0.1 nano: charged 1, never 0
    assert book.estimate("tiny", 1, 0) == 1
    # 5 + 5 tokens = 1 nano exactly: the ceil applies to the total, not each part
    assert book.estimate("tiny", 5, 5) == 1
    assert book.estimate("tiny", 6, 5) == 2


def test_price_book_constructor_validates_prices() -> None:
    assert ModelPrice("1.5", 2).input_per_million == Decimal("1.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_per_million must not be negative"):
        ModelPrice(Decimal("-1"), Decimal("1"))
    with pytest.raises(ValueError, match="output_per_million must be a finite number"):
        ModelPrice(Decimal("1"), Decimal("NaN"))


prices = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
tokens = st.integers(min_value=0, max_value=10**9)


@given(prices, prices, tokens, tokens, tokens, tokens)
def test_file_cost_monotone_in_tokens(
    input_price: Decimal, output_price: Decimal, i1: int, i2: int, o1: int, o2: int
) -> None:
    book = PriceBook({"m": ModelPrice(input_price, output_price)}, use_genai_prices=False)
    lo_in, hi_in = sorted((i1, i2))
    lo_out, hi_out = sorted((o1, o2))
    low = book.cost(["m"], lo_in, lo_out)
    assert low is not None
    for i, o in ((hi_in, lo_out), (lo_in, hi_out), (hi_in, hi_out)):
        high = book.cost(["m"], i, o)
        assert high is not None and high[0] >= low[0]
    # and it is exactly the ceiling of the exact charge
    exact = (lo_in * Fraction(input_price) + lo_out * Fraction(output_price)) * 1000
    assert low[0] - 1 < exact <= low[0]


def test_negative_tokens_rejected(book: PriceBook) -> None:
    with pytest.raises(ValueError):
        book.cost(["my-model"], -1, 0)
    with pytest.raises(ValueError):
        book.estimate("my-model", 0, -1)


# --- aliases ----------------------------------------------------------------------------------


def test_alias_to_file_model(book: PriceBook) -> None:
    assert book.cost(["team-model"], 1000, 500) == (2_000_000, "team-model")


def test_alias_to_genai_model(book: PriceBook) -> None:
    expected = genai_nanos("gpt-4o", 1000, 500)
    assert expected == 7_500_000  # $2.5/M in, $10/M out
    assert book.cost(["team-gpt"], 1000, 500) == (expected, "team-gpt")
    assert book.estimate("team-azure", 1000, 500) == genai_nanos("gpt-4o", 1000, 500, "azure")


def test_alias_with_provider_prefix(book: PriceBook) -> None:
    assert book.estimate("openai/team-model", 1000, 500) == 2_000_000


def test_alias_overrides_genai() -> None:
    book = PriceBook({"flat": ModelPrice(Decimal(1), Decimal(1))}, aliases={"gpt-4o": "flat"})
    assert book.estimate("gpt-4o", 1_000_000, 0) == NANOS_PER_DOLLAR


# --- provider prefixes ------------------------------------------------------------------------


def test_split_provider_prefix() -> None:
    assert split_provider_prefix("openai/gpt-4o") == ("openai", "gpt-4o")
    assert split_provider_prefix("Azure/gpt-4o") == ("azure", "gpt-4o")
    assert split_provider_prefix("bedrock/converse/anthropic.claude") == (
        "bedrock",
        "anthropic.claude",
    )
    assert split_provider_prefix("openrouter/anthropic/claude-3.5-sonnet") == (
        "openrouter",
        "anthropic/claude-3.5-sonnet",
    )
    assert split_provider_prefix("gpt-4o") is None
    assert (
        split_provider_prefix("meta-llama/Llama-3.3-70B-Instruct") is None
    )  # an org, not a provider
    assert split_provider_prefix("openai/") is None


def test_provider_map_targets_exist_in_genai_prices() -> None:
    ids = {p.id for p in genai_snapshot.get_snapshot().providers}
    assert set(LITELLM_TO_GENAI_PROVIDER.values()) <= ids


def test_file_model_with_provider_prefix(book: PriceBook) -> None:
    assert book.cost(["openai/my-model"], 1000, 500) == (2_000_000, "openai/my-model")
    assert book.estimate("hosted_vllm/my-model", 1000, 500) == 2_000_000
    # not a LiteLLM provider prefix: not stripped
    assert book.estimate("someorg/my-model", 1000, 500) is None


def test_file_full_name_wins_over_stripped_name() -> None:
    book = PriceBook(
        {
            "azure/my-model": ModelPrice(Decimal(5), Decimal(5)),
            "my-model": ModelPrice(Decimal(1), Decimal(1)),
        },
        use_genai_prices=False,
    )
    assert book.estimate("azure/my-model", 1_000_000, 0) == 5 * NANOS_PER_DOLLAR
    assert book.estimate("openai/my-model", 1_000_000, 0) == NANOS_PER_DOLLAR


@pytest.mark.parametrize(
    ("model", "model_ref", "provider_id"),
    [
        ("openai/gpt-4o", "gpt-4o", "openai"),
        ("azure/gpt-4o", "gpt-4o", "azure"),
        ("anthropic/claude-3-5-sonnet-20241022", "claude-3-5-sonnet-20241022", "anthropic"),
        (
            "bedrock/anthropic.claude-3-haiku-20240307-v1:0",
            "anthropic.claude-3-haiku-20240307-v1:0",
            "aws",
        ),
        (
            "bedrock/converse/anthropic.claude-3-haiku-20240307-v1:0",
            "anthropic.claude-3-haiku-20240307-v1:0",
            "aws",
        ),
        (
            "bedrock/us.anthropic.claude-3-5-sonnet-20241022-v2:0",
            "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
            "aws",
        ),
        ("vertex_ai/gemini-2.5-pro", "gemini-2.5-pro", "google"),
        ("vertex_ai/claude-3-5-sonnet@20240620", "claude-3-5-sonnet@20240620", "google"),
        ("gemini/gemini-2.0-flash", "gemini-2.0-flash", "google"),
        ("groq/llama-3.3-70b-versatile", "llama-3.3-70b-versatile", "groq"),
        ("xai/grok-2-1212", "grok-2-1212", "x-ai"),
        (
            "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "together",
        ),
        ("openrouter/anthropic/claude-3.5-sonnet", "anthropic/claude-3.5-sonnet", "openrouter"),
        ("mistral/mistral-large-latest", "mistral-large-latest", "mistral"),
    ],
)
def test_genai_provider_prefixes(model: str, model_ref: str, provider_id: str) -> None:
    book = PriceBook()
    for i, o in ((1000, 500), (123_457, 9_999)):
        assert book.estimate(model, i, o) == genai_nanos(model_ref, i, o, provider_id)


def test_prefix_unknown_to_provider_falls_back_to_no_provider() -> None:
    # genai-prices' aws has no gpt-4o: priced as gpt-4o without a provider (openai)
    assert PriceBook().estimate("bedrock/gpt-4o", 1000, 500) == genai_nanos("gpt-4o", 1000, 500)


# --- genai-prices behaviours ------------------------------------------------------------------


def test_genai_unknown_model_raises_lookup_error() -> None:
    with pytest.raises(LookupError):
        calc_price(Usage(input_tokens=1, output_tokens=1), model_ref="no-such-model-xyz")
    with pytest.raises(LookupError):
        calc_price(Usage(input_tokens=1), model_ref="gpt-4o", provider_id="no-such-provider")


@pytest.mark.parametrize("model", ["gpt-4o-2024-08-06", "gpt-4o-20240806", "GPT-4o"])
def test_date_suffixes_and_case_match_base_model(model: str) -> None:
    book = PriceBook()
    assert book.estimate(model, 1000, 500) == book.estimate("gpt-4o", 1000, 500) == 7_500_000


def test_dated_model_with_its_own_price() -> None:
    # gpt-4o-2024-05-13 is priced separately ($5/$15) and must not be priced as gpt-4o
    assert PriceBook().estimate("gpt-4o-2024-05-13", 1000, 500) == 12_500_000


def test_embeddings_found_via_openai_provider() -> None:
    assert PriceBook().estimate("text-embedding-3-small", 1_000_000, 0) == 20_000_000


def test_tiered_prices_match_genai() -> None:
    book = PriceBook()
    pricer = pricer_of(book, "gemini/gemini-2.5-pro")
    assert isinstance(pricer, GenaiModelPricer)
    for i in (0, 1, 199_999, 200_000, 200_001, 1_000_000):
        for o in (0, 1, 50_000):
            assert book.estimate("gemini/gemini-2.5-pro", i, o) == genai_nanos(
                "gemini-2.5-pro", i, o, "google"
            )
    # the cliff: above 200k input tokens the whole request is billed at the higher rate
    above = book.estimate("gemini/gemini-2.5-pro", 200_001, 0)
    below = book.estimate("gemini/gemini-2.5-pro", 100_000, 0)
    assert above is not None and below is not None and above > 2 * below


@pytest.mark.parametrize(
    "when",
    [
        datetime(2025, 6, 1, 3, 0, tzinfo=UTC),
        datetime(2025, 6, 1, 12, 0, tzinfo=UTC),
        datetime(2025, 6, 1, 20, 0, tzinfo=UTC),
    ],
)
def test_time_of_day_prices_follow_the_clock(
    when: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(genai_adapter, "_utcnow", lambda: when)
    usage = Usage(input_tokens=10_000, output_tokens=3_000)
    expected = calc_price(
        usage, model_ref="deepseek-chat", provider_id="deepseek", genai_request_timestamp=when
    ).total_price
    assert PriceBook().estimate("deepseek/deepseek-chat", 10_000, 3_000) == dollars_to_nanos(
        expected
    )


def test_models_not_priced_per_token_are_unpriced() -> None:
    book = PriceBook()
    assert not book.is_priced("whisper-1")  # priced per audio hour only
    assert not book.is_priced("tts-1")  # priced per character only


def test_free_models_cost_zero() -> None:
    # genai-prices lists subscription-included models with an empty price: free, not unknown
    assert PriceBook().cost(["github_copilot/gpt-4o"], 1000, 500) == (0, "github_copilot/gpt-4o")


def _all_genai_models() -> Iterator[tuple[Provider, ModelInfo]]:
    for provider in genai_snapshot.get_snapshot().providers:
        for model in provider.models:
            yield provider, model


def test_compiled_prices_match_calc_price_for_every_bundled_model() -> None:
    """Our integer price functions agree with genai-prices' calc_price on every model."""
    rng = random.Random(1234)
    points = [(0, 0), (1, 1), (128_000, 1), (128_001, 0), (200_000, 7), (200_001, 7)]
    points += [(10**7, 10**6)]
    checked = 0
    for provider, model in _all_genai_models():
        try:
            pricer = GenaiModelPricer(provider, model)
        except LookupError:
            continue
        extra = [(rng.randrange(2_000_000), rng.randrange(100_000)) for _ in range(3)]
        for i, o in points + extra:
            usage = Usage(input_tokens=i, output_tokens=o)
            expected = dollars_to_nanos(model.calc_price(usage, provider).total_price)
            assert pricer(i, o) == expected, (provider.id, model.id, i, o)
        checked += 1
    assert checked > 1000


def test_genai_pricers_are_compiled_not_delegated() -> None:
    book = PriceBook()
    gpt = pricer_of(book, "gpt-4o")
    gemini = pricer_of(book, "gemini/gemini-2.5-pro")
    assert isinstance(gpt, GenaiModelPricer) and isinstance(gpt._fixed, Affine)
    assert isinstance(gemini, GenaiModelPricer) and isinstance(gemini._fixed, Segmented)


# --- candidates, unpriced, caching ------------------------------------------------------------


def test_response_model_before_request_model(book: PriceBook) -> None:
    mini = genai_nanos("gpt-4o-mini", 1000, 500)
    assert book.cost(["gpt-4o-mini-2024-07-18", "gpt-4o"], 1000, 500) == (
        mini,
        "gpt-4o-mini-2024-07-18",
    )
    assert book.cost([None, "gpt-4o"], 1000, 500) == (7_500_000, "gpt-4o")
    assert book.cost(["", "my-model"], 1000, 500) == (2_000_000, "my-model")
    assert book.cost(["unknown-upstream-name", "my-model"], 1000, 500) == (2_000_000, "my-model")


def test_unpriced_returns_none(book: PriceBook) -> None:
    assert book.cost(["no-such-model-xyz"], 1000, 500) is None
    assert book.cost([None, "ollama/no-such-model-xyz"], 1000, 500) is None
    assert book.cost([], 1000, 500) is None
    assert book.estimate("no-such-model-xyz", 1, 1) is None
    assert book.estimate("", 1, 1) is None
    assert not book.is_priced("no-such-model-xyz")
    assert not book.is_priced("")


def test_genai_fallback_can_be_disabled() -> None:
    book = PriceBook({"m": ModelPrice(Decimal(1), Decimal(1))}, use_genai_prices=False)
    assert not book.is_priced("gpt-4o")
    assert book.is_priced("m")


def test_load_none_prices_through_genai() -> None:
    book = PriceBook.load(None)
    assert book.estimate("gpt-4o", 1000, 500) == 7_500_000
    assert book.estimate("my-model", 1000, 500) is None


def test_resolution_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_lookup = genai_adapter.lookup_model

    def counting_lookup(name: str, snapshot: object = None) -> object:
        calls.append(name)
        return real_lookup(name)

    monkeypatch.setattr(genai_adapter, "lookup_model", counting_lookup)
    book = PriceBook()
    for _ in range(100):
        book.cost(["gpt-4o-2024-08-06", "gpt-4o"], 1000, 500)
        book.cost(["no-such-model-xyz", "gpt-4o"], 1000, 500)
    assert sorted(calls) == ["gpt-4o", "gpt-4o-2024-08-06", "no-such-model-xyz"]


def test_new_genai_snapshot_invalidates_cache() -> None:
    book = PriceBook()
    assert book.is_priced("gpt-4o")
    empty = genai_snapshot.DataSnapshot(providers=[], from_auto_update=True)
    genai_snapshot.set_custom_snapshot(empty)
    try:
        assert not book.is_priced("gpt-4o")
    finally:
        genai_snapshot.set_custom_snapshot(None)
    assert book.is_priced("gpt-4o")


# --- prices files -----------------------------------------------------------------------------


def test_load_json(write_file: Callable[[str, str], str]) -> None:
    path = write_file(
        "prices.json",
        '{"models": {"j": {"input_per_million": 0.1, "output_per_million": "0.2"}},'
        ' "aliases": {"jj": "j"}}',
    )
    book = PriceBook.load(path)
    assert book.models["j"] == ModelPrice(Decimal("0.1"), Decimal("0.2"))
    assert book.estimate("jj", 10_000_000, 10_000_000) == 3 * NANOS_PER_DOLLAR


def test_load_other_extension_as_yaml(write_file: Callable[[str, str], str]) -> None:
    json_text = '{"models": {"j": {"input_per_million": 1, "output_per_million": 2}}}'
    assert PriceBook.load(write_file("prices.conf", json_text)).is_priced("j")
    yaml_text = "models:\n  y: {input_per_million: 1, output_per_million: 2}\n"
    assert PriceBook.load(write_file("prices", yaml_text)).is_priced("y")


def test_yaml_long_decimals_stay_exact(write_file: Callable[[str, str], str]) -> None:
    path = write_file(
        "p.yml",
        "models:\n"
        "  m: {input_per_million: 0.12345678901234567890123, output_per_million: 1_000.5}\n",
    )
    book = PriceBook.load(path)
    assert book.models["m"].input_per_million == Decimal("0.12345678901234567890123")
    assert book.models["m"].output_per_million == Decimal("1000.5")


def test_empty_sections_are_fine(write_file: Callable[[str, str], str]) -> None:
    book = PriceBook.load(write_file("p.yaml", "models:\naliases:\n"))
    assert not book.models and not book.aliases


YAML_ERRORS: list[tuple[str, str]] = [
    ("", "file is empty"),
    ("- a\n- b\n", "expected a mapping, got list"),
    ("model:\n  x: 1\n", "unknown key(s) 'model'"),
    ("models: [1, 2]\n", "models: expected a mapping"),
    ("models:\n  m: 1.0\n", "models.m: expected a mapping"),
    (
        "models:\n  m: {input_per_million: -1, output_per_million: 1}\n",
        "models.m.input_per_million: must not be negative",
    ),
    (
        "models:\n  m: {input_per_million: 1, output_per_million: abc}\n",
        "models.m.output_per_million: must be a number, got 'abc'",
    ),
    (
        "models:\n  m: {input_per_million: .nan, output_per_million: 1}\n",
        "models.m.input_per_million: must be a finite number",
    ),
    (
        "models:\n  m: {input_per_million: .inf, output_per_million: 1}\n",
        "models.m.input_per_million: must be a finite number",
    ),
    (
        "models:\n  m: {input_per_million: true, output_per_million: 1}\n",
        "models.m.input_per_million: must be a number, got bool",
    ),
    (
        "models:\n  m: {input_per_million: [1], output_per_million: 1}\n",
        "models.m.input_per_million: must be a number, got list",
    ),
    ("models:\n  m: {input_per_million: 1}\n", "models.m: missing output_per_million"),
    (
        "models:\n  m: {input_per_million: 1, output_per_milion: 1}\n",
        "models.m: unknown key(s) 'output_per_milion'",
    ),
    (
        "models:\n  123: {input_per_million: 1, output_per_million: 1}\n",
        "must be a non-empty string",
    ),
    (
        "models:\n  m: {input_per_million: 1, output_per_million: 1}\n"
        "  m: {input_per_million: 2, output_per_million: 2}\n",
        "duplicate key 'm'",
    ),
    ("models: {m: [\n", "invalid YAML"),
    ("aliases: [a]\n", "aliases: expected a mapping"),
    ("aliases:\n  a: 5\n", "aliases.a: target must be a model name string"),
    ("aliases:\n  a: no-such-model-xyz\n", "aliases.a: target 'no-such-model-xyz' is not priced"),
    ("aliases:\n  a: b\n  b: gpt-4o\n", "aliases.a: target 'b' is itself an alias"),
    (
        "models:\n  m: {input_per_million: 1, output_per_million: 1}\naliases:\n  m: gpt-4o\n",
        "aliases.m: 'm' is also defined under models",
    ),
    # The keys of SPEC 10.
    (
        "models:\n  m: {input_per_million: 1, output_per_million: 1, context_window: 0}\n",
        "models.m.context_window: must be a positive integer",
    ),
    (
        "models:\n  m: {input_per_million: 1, output_per_million: 1, max_tokens_per_image: 1.5}\n",
        "models.m.max_tokens_per_image: must be a positive integer",
    ),
    (
        "models:\n  m: {input_per_million: 1, output_per_million: 1, tool_call_fee: -1}\n",
        "models.m.tool_call_fee: must not be negative",
    ),
    (
        "models:\n  m: {input_per_million: 1, output_per_million: 1, per_image: {}}\n",
        "models.m.per_image: must not be empty",
    ),
    (
        "models:\n  m: {input_per_million: 1, output_per_million: 1, per_image: {high: x}}\n",
        "models.m.per_image: must be a number, got 'x'",
    ),
    (
        "models:\n  m: {input_per_million: 1, output_per_million: 1, answers_as: gpt-4o}\n",
        "models.m.answers_as: must be a list of model names",
    ),
    (
        "models:\n  m: {input_per_million: 1, output_per_million: 1, answers_as: [nope-xyz]}\n",
        "models.m.answers_as: 'nope-xyz' is not priced",
    ),
]


@pytest.mark.parametrize(("text", "problem"), YAML_ERRORS)
def test_bad_yaml_files(text: str, problem: str, write_file: Callable[[str, str], str]) -> None:
    path = write_file("bad.yaml", text)
    with pytest.raises(PricesFileError) as excinfo:
        PriceBook.load(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ")
    assert problem in message


JSON_ERRORS: list[tuple[str, str]] = [
    ("", "invalid JSON"),
    ("{", "invalid JSON"),
    ("[]", "expected a mapping, got list"),
    ('{"models": {}, "extra": 1}', "unknown key(s) 'extra'"),
    (
        '{"models": {"m": {"input_per_million": -0.5, "output_per_million": 1}}}',
        "models.m.input_per_million: must not be negative",
    ),
    (
        '{"models": {"m": {"input_per_million": "1.x", "output_per_million": 1}}}',
        "models.m.input_per_million: must be a number, got '1.x'",
    ),
    (
        '{"models": {"m": {"input_per_million": NaN, "output_per_million": 1}}}',
        "models.m.input_per_million: must be a finite number",
    ),
    (
        '{"models": {"m": {"input_per_million": 1, "output_per_million": null}}}',
        "models.m.output_per_million: must be a number, got NoneType",
    ),
    (
        '{"models": {"m": {"input_per_million": 1, "output_per_million": 1},'
        ' "m": {"input_per_million": 1, "output_per_million": 1}}}',
        "duplicate key 'm'",
    ),
]


@pytest.mark.parametrize(("text", "problem"), JSON_ERRORS)
def test_bad_json_files(text: str, problem: str, write_file: Callable[[str, str], str]) -> None:
    path = write_file("bad.json", text)
    with pytest.raises(PricesFileError) as excinfo:
        PriceBook.load(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ")
    assert problem in message


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(PricesFileError, match="nope.yaml: cannot read prices file"):
        PriceBook.load(path)


def test_prices_file_error_is_value_error() -> None:
    assert issubclass(PricesFileError, ValueError)


def test_compile_handcrafted_tiers_including_a_zero_threshold() -> None:
    from genai_prices.types import ModelPrice as GenaiModelPrice
    from genai_prices.types import Tier, TieredPrices

    from app.pricing.genai import compile_model_price

    price = GenaiModelPrice(
        input_mtok=TieredPrices(
            base=Decimal("1"), tiers=[Tier(start=0, price=Decimal("2")), Tier(1000, Decimal("3"))]
        ),
        output_mtok=Decimal("0.7"),
    )
    pricer = compile_model_price(price)
    assert isinstance(pricer, Segmented)
    for i in (0, 1, 999, 1000, 1001, 5000):
        for o in (0, 3, 1234):
            usage = Usage(input_tokens=i, output_tokens=o)
            assert pricer(i, o) == dollars_to_nanos(price.calc_price(usage)["total_price"])


def test_prices_file_keys_of_the_bound(write_file: Callable[[str, str], str]) -> None:
    book = PriceBook.load(
        write_file(
            "prices.yaml",
            """
models:
  gpt-4o:                      # a file price for a name genai-prices knows
    input_per_million: 1
    output_per_million: 2
  tight-4o:
    input_per_million: 1
    output_per_million: 2
    context_window: 1000
    max_tokens_per_image: 85
    tool_call_fee: 0.02
    per_image: 0.04
    answers_as: [gpt-4o-mini]
""",
        )
    )
    own = book.profile("gpt-4o")
    assert own is not None and own.context_window == 128_000  # from genai-prices
    assert own.prices[0].input_mtok == Decimal(1)  # the file's price, not genai-prices'
    tight = book.profile("tight-4o")
    assert tight is not None
    assert (tight.context_window, tight.max_tokens_per_image) == (1000, 85)
    assert tight.tool_call_fee == Decimal("0.02")
    assert dict(tight.per_image) == {"": Decimal("0.04")}
    assert tight.answers_as == ("gpt-4o-mini",)
