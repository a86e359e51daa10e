"""The reservation is an upper bound of the bill (SPEC 10): for generated requests and any bill
a provider could send for them (tests/pricing/provider.py), bill <= bound."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.config import Settings
from app.errors import AppError
from app.pricing.bounds import DEFAULT_TOOL_CALL_FEE, image_price, request_bound
from app.pricing.cost import CostCalculator, price_usage
from app.pricing.money import NANOS_PER_DOLLAR
from app.pricing.prices import ModelPrice, PriceBook
from app.pricing.usage import Usage
from app.proxy.request import parse_metered
from tests.pricing.provider import IMAGE_TOKENS, Request, some_bill

D = Decimal
BOOK = PriceBook(
    {
        "file-audio": ModelPrice(
            D("2.5"),
            D(10),
            cache_read_per_million=D("1.25"),
            input_audio_per_million=D(32),
            output_audio_per_million=D(64),
            context_window=128_000,
        ),
        "file-capped": ModelPrice(
            D(1),
            D(2),
            context_window=100_000,
            max_tokens_per_image=2_000,
            tool_call_fee=D("0.05"),
            cache_write_per_million=D("1.25"),
            cache_write_1h_per_million=D(2),
        ),
        "router": ModelPrice(
            D("0.1"),
            D("0.2"),
            context_window=128_000,
            answers_as=("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5"),
        ),
        "no-window": ModelPrice(D(1), D(1)),
        "tts-file": ModelPrice(D(0), D(0), per_million_characters=D(15)),
        "img-file": ModelPrice(
            D(5), D(40), per_image={"1024x1024/low": D("0.011"), "high": D("0.25")}
        ),
    }
)
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "file-audio", "file-capped", "router"]
SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]
COSTS = CostCalculator(BOOK, "reject", True)
DEFAULT_CAP = SETTINGS.default_max_output_tokens
DEFAULT_CALLS = SETTINGS.default_max_tool_calls

words = st.text(alphabet="abc xyzé€\n", max_size=40)
caps = st.integers(1, 5_000)


@st.composite
def chat(draw: st.DrawFn, req: Request) -> None:
    messages = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            messages.append({"role": "user", "content": draw(words)})
            continue
        parts: list[dict[str, Any]] = []
        for kind in draw(st.lists(st.sampled_from(["text", "image", "audio", "file"]), max_size=4)):
            if kind == "text":
                parts.append({"type": "text", "text": draw(words)})
            elif kind == "image":
                req.images += 1
                url = {"url": "https://x/i.png", "detail": "high"}
                parts.append({"type": "image_url", "image_url": url})
            elif kind == "audio":
                req.audio_input = req.unmeasurable = True
                parts.append(
                    {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}
                )
            else:
                req.unmeasurable = True
                parts.append({"type": "file", "file": {"file_id": "file-1"}})
        messages.append({"role": "user", "content": parts})
    req.body["messages"] = messages
    n = draw(st.one_of(st.none(), st.integers(1, 8)))
    if n is not None:
        req.body["n"] = n
    req.samplings = n or 1
    field = draw(st.sampled_from([None, "max_tokens", "max_completion_tokens"]))
    req.output_cap = draw(caps) if field else DEFAULT_CAP
    if field:
        req.body[field] = req.output_cap
    if draw(st.booleans()):
        req.body["modalities"] = ["text", "audio"]
        req.body["audio"] = {"voice": "alloy", "format": "wav"}
        req.audio_output = True
    if draw(st.booleans()):
        req.body["prediction"] = prediction = {"type": "content", "content": draw(words)}
        req.prediction_bytes = len(orjson.dumps(prediction))
    tools = draw(st.sampled_from(["none", "function", "web_search_options"]))
    if tools == "function":
        req.body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    elif tools == "web_search_options":
        req.body["web_search_options"] = {}
        req.tool_calls, req.unmeasurable = DEFAULT_CALLS, True


@st.composite
def completions(draw: st.DrawFn, req: Request) -> None:
    prompt = draw(
        st.one_of(
            words,
            st.lists(words, min_size=1, max_size=40),
            st.lists(st.lists(st.integers(0, 50_000), max_size=5), min_size=1, max_size=40),
            st.lists(st.integers(0, 50_000), min_size=1, max_size=20),
        )
    )
    req.body["prompt"] = prompt
    prompts = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str | list) else 1
    n = draw(st.integers(1, 4))
    best_of = draw(st.integers(1, 5))
    req.body.update(n=n, best_of=best_of)
    req.samplings = prompts * max(n, best_of)
    if draw(st.booleans()):
        req.body["max_tokens"] = req.output_cap = draw(caps)
    else:
        req.output_cap = DEFAULT_CAP


@st.composite
def responses(draw: st.DrawFn, req: Request) -> None:
    if draw(st.booleans()):
        req.body["input"] = draw(words)
    else:
        parts: list[dict[str, Any]] = [{"type": "input_text", "text": draw(words)}]
        for kind in draw(st.lists(st.sampled_from(["image", "file"]), max_size=3)):
            if kind == "image":
                req.images += 1
                parts.append({"type": "input_image", "image_url": "https://x/i.png"})
            else:
                req.unmeasurable = True
                parts.append({"type": "input_file", "file_url": "https://x/doc.pdf"})
        req.body["input"] = [{"role": "user", "content": parts}]
    if draw(st.booleans()):
        req.body["previous_response_id"] = "resp_1"
        req.unmeasurable = True
    if draw(st.booleans()):
        req.body["max_output_tokens"] = req.output_cap = draw(caps)
    else:
        req.output_cap = DEFAULT_CAP
    tool = draw(
        st.sampled_from([None, "web_search", "file_search", "code_interpreter", "image_generation"])
    )
    if tool:
        req.body["tools"] = [{"type": tool}]
        req.image_tool = tool == "image_generation"
        calls = draw(st.one_of(st.none(), st.integers(0, 20)))
        if calls is not None:
            req.body["max_tool_calls"] = calls
        req.tool_calls = DEFAULT_CALLS if calls is None else calls
        req.unmeasurable = req.unmeasurable or req.tool_calls > 0


@st.composite
def messages(draw: st.DrawFn, req: Request) -> None:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": draw(words)}]
    for kind in draw(st.lists(st.sampled_from(["image", "document"]), max_size=3)):
        if kind == "image":
            req.images += 1
            source = {"type": "url", "url": "https://x/i.png"}
            blocks.append({"type": "image", "source": source})
        else:
            req.unmeasurable = True
            source = {"type": "url", "url": "https://x/doc.pdf"}
            blocks.append({"type": "document", "source": source})
    req.body["messages"] = [{"role": "user", "content": blocks}]
    if draw(st.booleans()):
        req.body["system"] = draw(words)
    if draw(st.booleans()):
        req.body["max_tokens"] = req.output_cap = draw(caps)
    else:
        req.output_cap = DEFAULT_CAP
    if draw(st.booleans()):
        uses = draw(st.one_of(st.none(), st.integers(1, 10)))
        tool: dict[str, Any] = {"type": "web_search_20250305", "name": "web_search"}
        if uses is not None:
            tool["max_uses"] = uses
        req.body["tools"] = [tool]
        req.tool_calls, req.unmeasurable = uses or DEFAULT_CALLS, True


@st.composite
def embeddings(draw: st.DrawFn, req: Request) -> None:
    req.body["input"] = draw(st.one_of(words, st.lists(words, min_size=1, max_size=10)))


BUILDERS = {
    "/chat/completions": chat,
    "/completions": completions,
    "/responses": responses,
    "/messages": messages,
    "/embeddings": embeddings,
}


@st.composite
def requests(draw: st.DrawFn) -> Request:
    endpoint = draw(st.sampled_from(sorted(BUILDERS)))
    model = draw(st.sampled_from(MODELS))
    req = Request(endpoint, {"model": model})
    draw(BUILDERS[endpoint](req))
    profile = BOOK.profile(model)
    assert profile is not None
    req.answered_by = [model, *profile.answers_as]
    return req


def per_image_tokens(model: str) -> int | None:
    profile = BOOK.profile(model)
    assert profile is not None
    return profile.max_tokens_per_image or IMAGE_TOKENS.get(model)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests(), seed=st.integers(0, 2**32))
def test_no_bill_a_provider_can_send_exceeds_the_reservation(req: Request, seed: int) -> None:
    metered = parse_metered(req.endpoint, req.raw, SETTINGS)
    try:
        bound = COSTS.bound(metered)
    except AppError as refused:
        # Refused before forwarding (nothing billed): only what cannot be bounded.
        assert refused.status == 400, refused
        assert req.audio_input or req.audio_output, refused
        return
    rng = random.Random(seed)
    for answer in req.answered_by:
        profile = BOOK.profile(answer)
        assert profile is not None
        for _ in range(5):
            usage = some_bill(req, profile.context_window, per_image_tokens(answer), rng)
            bill = price_usage(profile, usage)
            assert bill is not None
            assert bill <= bound, (answer, usage, bill, bound, metered)


def test_the_dearest_bill_reaches_the_bound_for_plain_text() -> None:
    """The bound is not loose for what it can measure: n x max_tokens of output plus the
    body's bytes of input is exactly what it reserves."""
    content = [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    body = {"model": "file-capped", "messages": [{"role": "user", "content": content}], "n": 3}
    body["max_tokens"] = 100
    raw = orjson.dumps(body)
    metered = parse_metered("/chat/completions", raw, SETTINGS)
    profile = BOOK.profile("file-capped")
    assert profile is not None
    # Dearest input: 1-hour cache writes at $2/M; output $2/M.
    expected = len(raw) * 2_000 + 3 * 100 * 2_000
    assert COSTS.bound(metered) == expected
    worst = Usage(len(raw), 300, cache_write_1h_tokens=len(raw))
    assert price_usage(profile, worst) == expected
    # Without a 1-hour TTL asked for, the dearest input is a 5-minute write ($1.25/M).
    del content[0]["cache_control"]
    raw = orjson.dumps(body)
    assert COSTS.bound(parse_metered("/chat/completions", raw, SETTINGS)) == (
        len(raw) * 1_250 + 3 * 100 * 2_000
    )


@pytest.mark.parametrize(
    "body,multiplier",
    [
        ({"n": 8}, 8),
        ({"prompt": ["a"] * 2048}, 2048),
        ({"prompt": [[1, 2]] * 10, "best_of": 20, "n": 2}, 200),
        ({"prompt": [1, 2, 3]}, 1),  # one prompt as token ids
    ],
)
def test_output_multipliers(body: dict[str, Any], multiplier: int) -> None:
    endpoint = "/completions" if "prompt" in body else "/chat/completions"
    full = {"model": "file-capped", "max_tokens": 10, **body}
    if endpoint == "/chat/completions":
        full["messages"] = []
    metered = parse_metered(endpoint, orjson.dumps(full), SETTINGS)
    assert metered.samplings * metered.output_bound == 10 * multiplier


def test_unmeasurable_input_without_a_context_window_is_refused() -> None:
    body = {"model": "no-window", "input": "x", "previous_response_id": "resp_1"}
    metered = parse_metered("/responses", orjson.dumps(body), SETTINGS)
    with pytest.raises(AppError) as refused:
        COSTS.bound(metered)
    assert refused.value.status == 400
    assert "context_window" in str(refused.value)


def test_output_bound_zero_is_422() -> None:
    for endpoint, field in [
        ("/chat/completions", "max_tokens"),
        ("/chat/completions", "max_completion_tokens"),
        ("/responses", "max_output_tokens"),
        ("/messages", "max_tokens"),
        ("/completions", "max_tokens"),
    ]:
        with pytest.raises(AppError) as refused:
            parse_metered(endpoint, orjson.dumps({"model": "m", field: 0}), SETTINGS)
        assert refused.value.status == 422


def test_tool_calls_are_capped_in_the_forwarded_body() -> None:
    body = {"model": "gpt-4o", "input": "x", "tools": [{"type": "web_search"}]}
    metered = parse_metered("/responses", orjson.dumps(body), SETTINGS)
    assert orjson.loads(metered.body)["max_tool_calls"] == DEFAULT_CALLS == metered.tool_calls
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 5,
        "messages": [],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    }
    metered = parse_metered("/messages", orjson.dumps(body), SETTINGS)
    assert orjson.loads(metered.body)["tools"][0]["max_uses"] == DEFAULT_CALLS
    # A tool whose fee is unknown costs the default fee per call.
    profile = BOOK.profile("gpt-4o")
    assert profile is not None
    usage = Usage(0, 0, code_executions=2)
    assert price_usage(profile, usage) == 2 * DEFAULT_TOOL_CALL_FEE * NANOS_PER_DOLLAR


def test_path_model_is_priced_and_must_agree_with_the_body() -> None:
    raw = orjson.dumps({"messages": [], "max_tokens": 1})
    assert parse_metered("/chat/completions", raw, SETTINGS, "gpt-4o").model == "gpt-4o"
    raw = orjson.dumps({"model": "gpt-4o-mini", "messages": [], "max_tokens": 1})
    with pytest.raises(AppError) as refused:
        parse_metered("/chat/completions", raw, SETTINGS, "gpt-4o")
    assert refused.value.status == 400


@example(size="1024x1024", quality="low", expected="0.011")
@example(size="1024x1536", quality="high", expected="0.25")
@example(size=None, quality=None, expected="0.25")
@example(size="1024x1024", quality="medium", expected="0.25")  # unknown: the dearest
@given(size=st.none(), quality=st.none(), expected=st.just("0.25"))
def test_image_prices(size: str | None, quality: str | None, expected: str) -> None:
    profile = BOOK.profile("img-file")
    assert profile is not None
    assert image_price(profile.per_image, size, quality) == Decimal(expected)


def test_images_and_speech_bounds() -> None:
    raw = orjson.dumps({"model": "img-file", "prompt": "cat", "n": 3, "quality": "low"})
    metered = parse_metered("/images/generations", raw, SETTINGS)
    # 3 x the dearest low-quality price of any size ($0.011 at 1024x1024 only: the "high"
    # entry does not apply), plus the prompt's bytes at $5/M.
    assert COSTS.bound(metered) == 3 * 11_000_000 + len(raw) * 5_000
    raw = orjson.dumps({"model": "tts-file", "input": "hello world", "voice": "alloy"})
    metered = parse_metered("/audio/speech", raw, SETTINGS)
    assert COSTS.bound(metered) == 11 * 15_000  # $15 per 1M characters


def test_answers_as_bounds_by_the_dearest_model() -> None:
    raw = orjson.dumps({"model": "router", "messages": [], "max_tokens": 1000})
    metered = parse_metered("/chat/completions", raw, SETTINGS)
    bounds = {}
    for name in ("router", "gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5"):
        profile = BOOK.profile(name)
        assert profile is not None
        bounds[name] = request_bound(profile, metered)
    assert COSTS.bound(metered) == max(bounds.values()) == bounds["claude-sonnet-4-5"]


def test_unpriced_model_under_free_reserves_nothing() -> None:
    free = CostCalculator(BOOK, "free", True)
    raw = orjson.dumps({"model": "nobody-knows", "messages": [], "n": 5})
    assert free.bound(parse_metered("/chat/completions", raw, SETTINGS)) == 0


@given(room=st.integers(0, 10**9), minimum=st.integers(1, 5_000), asked=st.integers(1, 50_000))
def test_shrink_to_fit_finds_the_largest_output_bound_that_fits(
    room: int, minimum: int, asked: int
) -> None:
    raw = orjson.dumps({"model": "router", "messages": [], "n": 2, "max_tokens": asked})
    metered = parse_metered("/chat/completions", raw, SETTINGS)
    fitted = COSTS.fit_output(metered, room, minimum)
    assert metered.output_bound == asked  # the request is left as it was
    if fitted is None:
        if asked >= minimum:
            metered.output_bound = minimum
            assert COSTS.bound(metered) > room
        return
    assert minimum <= fitted <= asked
    metered.output_bound = fitted
    assert COSTS.bound(metered) <= room
    if fitted < asked:
        metered.output_bound = fitted + 1
        assert COSTS.bound(metered) > room


def test_embeddings_of_objects_are_bounded_by_the_context_window() -> None:
    text = parse_metered("/embeddings", orjson.dumps({"model": "m", "input": ["a", "b"]}), SETTINGS)
    assert text.unmeasured == []
    image = {"model": "m", "input": [{"image": "https://x/i.png"}]}
    assert parse_metered("/embeddings", orjson.dumps(image), SETTINGS).unmeasured


def test_answers_as_is_followed_through_every_level() -> None:
    book = PriceBook(
        {
            "front": ModelPrice(D(0), D(0), answers_as=("middle",)),
            "middle": ModelPrice(D(0), D(0), answers_as=("front", "dear")),
            "dear": ModelPrice(D(0), D(1000)),
        },
        use_genai_prices=False,
    )
    raw = orjson.dumps({"model": "front", "messages": [], "max_tokens": 10})
    metered = parse_metered("/chat/completions", raw, SETTINGS)
    assert CostCalculator(book, "reject", True).bound(metered) == 10 * 1_000_000


# What gpt-image-1 bills per image (BILLING-RULES: LiteLLM's table), by the size and quality it
# actually renders; a request leaving either open ("auto" or absent) may get any.
GPT_IMAGE_1 = {
    ("1024x1024", "low"): D("0.011"),
    ("1024x1024", "medium"): D("0.042"),
    ("1024x1024", "high"): D("0.167"),
    **{(s, "low"): D("0.016") for s in ("1024x1536", "1536x1024")},
    **{(s, "medium"): D("0.063") for s in ("1024x1536", "1536x1024")},
    **{(s, "high"): D("0.25") for s in ("1024x1536", "1536x1024")},
}


@given(
    size=st.sampled_from([None, "auto", "1024x1024", "1024x1536", "1536x1024"]),
    quality=st.sampled_from([None, "auto", "low", "medium", "high"]),
    n=st.integers(1, 10),
    prompt=words,
    data=st.data(),
)
def test_no_image_bill_exceeds_the_reservation(
    size: str | None, quality: str | None, n: int, prompt: str, data: st.DataObject
) -> None:
    body: dict[str, Any] = {"model": "gpt-image-1", "prompt": prompt, "n": n}
    if size:
        body["size"] = size
    if quality:
        body["quality"] = quality
    raw = orjson.dumps(body)
    bound = COSTS.bound(parse_metered("/images/generations", raw, SETTINGS))
    rendered = [
        price
        for (s, q), price in GPT_IMAGE_1.items()
        if size in (None, "auto", s) and quality in (None, "auto", q)
    ]
    each = data.draw(st.sampled_from(rendered))
    profile = BOOK.profile("gpt-image-1")
    assert profile is not None
    prompt_tokens = data.draw(st.integers(0, len(raw)))
    bill = n * each * NANOS_PER_DOLLAR + price_usage(profile, Usage(prompt_tokens, 0))  # type: ignore[operator]
    assert bill <= bound
