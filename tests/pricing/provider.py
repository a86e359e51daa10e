"""A provider's bill, written from what the billing rules say a provider may charge for a
request (../shared/BILLING-RULES.md), independently of the gateway's bound: the property
tests and the budget-breaker upstream both bill with it.

`Request` is what a test generated (so the bill does not depend on how the gateway parses the
body); `some_bill` is one usage a provider could report for it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.pricing.usage import Usage

# Tokens one image part can cost at most, by model (BILLING-RULES section 2: tile models);
# a model not listed may bill an image up to its context window.
IMAGE_TOKENS = {"gpt-4o-mini": 48_169, "gpt-4o": 1_445}


@dataclass
class Request:
    endpoint: str
    body: dict[str, Any]
    samplings: int = 1  # n x best_of x prompts, as generated
    output_cap: int = 0  # per sampling (what the forwarded body allows)
    images: int = 0
    unmeasurable: bool = False  # documents, stored context, audio: up to the context window
    audio_input: bool = False
    audio_output: bool = False
    tool_calls: int = 0  # fee-bearing calls allowed
    image_tool: bool = False  # a tool that generates an image per call
    prediction_bytes: int = 0
    answered_by: list[str] = field(default_factory=list)  # the model and its answers_as

    @property
    def raw(self) -> bytes:
        return orjson.dumps(self.body)

    @property
    def passes(self) -> int:
        return 1 + self.tool_calls


def per_pass_input(req: Request, context_window: int | None, per_image: int | None) -> int:
    """The most input tokens one sampling can be billed."""
    images = req.images * (per_image if per_image is not None else (context_window or 0))
    tokens = len(req.raw) + images
    if req.unmeasurable or (req.images and per_image is None):
        assert context_window is not None
        tokens = context_window
    return min(tokens, context_window) if context_window is not None else tokens


def some_bill(
    req: Request, context_window: int | None, per_image: int | None, rng: random.Random
) -> Usage:
    """One usage a provider could report: every count between 0 and the most the request
    allows, half of the time exactly that most."""

    def upto(limit: int) -> int:
        return limit if rng.random() < 0.5 else rng.randint(0, max(limit, 0))

    passes = req.passes
    prompt = sum(upto(per_pass_input(req, context_window, per_image)) for _ in range(passes))
    output_passes = 1 if req.endpoint == "/responses" else passes
    completion = upto(req.samplings * req.output_cap * output_passes + req.prediction_bytes)
    # Parts of the input with their own prices (cache reads and writes, audio), within it.
    cuts = sorted(rng.randint(0, prompt) for _ in range(4))
    read, write, write_1h, audio = (b - a for a, b in zip([0, *cuts[:3]], cuts, strict=True))
    audio_out = upto(completion) if req.audio_output else 0
    calls = upto(req.tool_calls)
    web = rng.randint(0, calls)
    files = rng.randint(0, calls - web)
    images = rng.randint(0, calls - web - files) if req.image_tool else 0
    return Usage(
        prompt,
        completion,
        cache_read_tokens=read,
        # 1-hour cache writes only when asked for (Anthropic: cache_control ttl "1h").
        cache_write_tokens=write + (0 if b'"1h"' in req.raw else write_1h),
        cache_write_1h_tokens=write_1h if b'"1h"' in req.raw else 0,
        input_audio_tokens=audio if req.audio_input else 0,
        output_audio_tokens=audio_out,
        reasoning_tokens=upto(completion - audio_out),
        web_searches=web,
        file_searches=files,
        code_executions=calls - web - files - images,
        images_generated=images,
    )
