"""What the gateway must know of a metered request before admitting it, and the small changes
it makes to the forwarded body so that its cost bound holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from app.config import Settings
from app.errors import BadRequest, InvalidField

STREAMABLE = frozenset({"/chat/completions", "/completions", "/responses", "/messages"})
# The field each API uses for its output bound, and the ones it also accepts.
OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/completions": ("max_tokens",),
    "/responses": ("max_output_tokens",),
    "/messages": ("max_tokens",),
}
MAX_TOKENS_LIMIT = 10_000_000


@dataclass
class MeteredRequest:
    endpoint: str  # the metered API, e.g. "/chat/completions"
    model: str
    stream: bool
    body: bytes  # what is forwarded
    input_bound: int  # tokens: no more than the body's bytes
    output_bound: int  # tokens
    client_wants_usage: bool  # streamed chat/completions: did the client ask for the usage chunk


def _positive_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
        or value > MAX_TOKENS_LIMIT
    ):
        raise InvalidField(
            f"{field} must be an integer between 0 and {MAX_TOKENS_LIMIT}", param=field
        )
    return value


def parse_metered(
    endpoint: str, raw: bytes, settings: Settings, path_model: str | None = None
) -> MeteredRequest:
    """`endpoint`: the metered API (the route's); `path_model`: the model named by the path
    (LiteLLM's aliases), which is the one priced."""
    default_output_tokens = settings.default_max_output_tokens
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if path_model is not None:
        if model is not None and model != path_model:
            raise BadRequest(
                f"the body's model '{model}' differs from the path's model '{path_model}': "
                "name the model once",
                param="model",
            )
        model = path_model
    if not isinstance(model, str) or not model or len(model) > 255:
        raise InvalidField("model is required and must be a non-empty string", param="model")
    if "\x00" in model:  # no model has one, and the ledger (PostgreSQL text) cannot hold it
        raise InvalidField("model must not contain NUL characters", param="model")
    stream = body.get("stream")
    if stream is None:  # absent or null: not streamed (as OpenAI and LiteLLM read it)
        stream = False
    if not isinstance(stream, bool):
        raise InvalidField("stream must be true or false", param="stream")
    if endpoint not in STREAMABLE:
        stream = False

    changed = False
    output_bound = 0
    fields = OUTPUT_FIELDS.get(endpoint, ())
    if fields:
        bounds = [b for b in (_positive_int(body, f) for f in fields) if b is not None]
        if bounds:
            output_bound = max(bounds)
        else:
            # No bound named: set the default, so the upstream stops where the estimate does.
            body[fields[-1]] = default_output_tokens
            output_bound = default_output_tokens
            changed = True

    wants_usage = True
    if stream and endpoint in ("/chat/completions", "/completions"):
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidField("stream_options must be an object", param="stream_options")
        wants_usage = bool(options and options.get("include_usage") is True)
        if not wants_usage:
            body["stream_options"] = {**(options or {}), "include_usage": True}
            changed = True

    return MeteredRequest(
        endpoint=endpoint,
        model=model,
        stream=stream,
        body=orjson.dumps(body) if changed else raw,
        input_bound=len(raw),
        output_bound=output_bound,
        client_wants_usage=wants_usage,
    )
