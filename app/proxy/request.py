"""What the gateway must know of a metered request before admitting it, and the small changes
it makes to the forwarded body so that its cost bound holds (SPEC 10).

Everything here is read from the body; what it costs is app/pricing/bounds.py's business.
When unsure whether a part of the body can cost money, it is taken to cost money: a content
part or item of a type not known to be text in the body counts as input the gateway cannot
measure, a tool not known to be client-side as a fee-bearing server-side tool.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.config import Settings
from app.errors import BadRequest, InvalidField

STREAMABLE = frozenset({"/chat/completions", "/completions", "/responses", "/messages"})
# The field each API uses for its output bound, and the ones it also accepts; the last one is
# where the default is written when none is given.
OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/completions": ("max_tokens",),
    "/responses": ("max_output_tokens",),
    "/messages": ("max_tokens",),
}
MAX_TOKENS_LIMIT = 10_000_000
MAX_MULTIPLIER = 10_000

# Content parts and items whose tokens are all in the body (bounded by its size).
_TEXT_PARTS = frozenset(
    {"text", "input_text", "output_text", "refusal", "summary_text", "reasoning_text"}
)
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
_AUDIO_PARTS = frozenset({"input_audio", "audio"})
# /responses input items carried whole in the body.
_INLINE_ITEMS = frozenset(
    {
        "message",
        "function_call",
        "function_call_output",
        "custom_tool_call",
        "custom_tool_call_output",
        "reasoning",
    }
)
# Anthropic content blocks carried whole in the body (tool_result is looked into).
_INLINE_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking"})
# Chat message keys that carry nothing billed from outside the body.
_MESSAGE_KEYS = frozenset(
    {
        "role",
        "content",
        "name",
        "tool_calls",
        "tool_call_id",
        "refusal",
        "function_call",
        "reasoning_content",
        "thinking_blocks",
        "cache_control",
        "annotations",
    }
)
# Keys by which a part without a type could still point at content outside the body.
_REFERENCE_KEYS = frozenset(
    {
        "image_url",
        "image",
        "document",
        "video",
        "file_id",
        "file_url",
        "file_data",
        "file",
        "input_audio",
        "url",
        "source",
        "id",
    }
)
_CLIENT_TOOLS = frozenset({"function", "custom"})
# Top-level fields that make the upstream bill input that is not in the body.
_STORED_CONTEXT = ("previous_response_id", "conversation", "prompt", "container", "mcp_servers")


@dataclass
class MeteredRequest:
    endpoint: str  # canonical metered endpoint ("/chat/completions", ...)
    model: str  # the model priced: the path's model for LiteLLM's aliases, else the body's
    stream: bool
    body: bytes  # what is forwarded (with the bounds the gateway wrote into it)
    input_bound: int  # tokens of input in the body, per pass: no more than its bytes
    output_bound: int  # output tokens per sampling: the forwarded cap
    client_wants_usage: bool  # streamed chat/completions: did the client ask for the usage chunk
    output_field: str | None = None  # the body field holding output_bound (None: no output)
    samplings: int = 1  # outputs the request asks for: n x best_of x prompts
    images: int = 0  # image parts (each bounded by the context window, or the prices file)
    unmeasured: list[str] = field(default_factory=list)  # other input not in the body, why
    audio_input: bool = False
    audio_output: bool = False
    long_cache_writes: bool = False  # a 1-hour cache TTL is asked for (dearer cache writes)
    tool_calls: int = 0  # fee-bearing server-side tool calls it may make
    image_tool: bool = False  # one of its tools generates images (each call: an image's price)
    prediction_bound: int = 0  # tokens of a predicted output, billed as output if rejected
    image_size: str | None = None  # /images/generations
    image_quality: str | None = None
    characters: int = 0  # /audio/speech: input characters
    end_user: Any = None  # the body's `user` (the caller's own customer), unchecked
    tags: Any = None  # the body's metadata.tags, unchecked

    @property
    def passes(self) -> int:
        """How many times the input may be billed: once, and once more after each server-side
        tool call (the model samples again over the grown context)."""
        return 1 + self.tool_calls


def _bounded_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidField(f"{name} must be an integer between {low} and {high}", param=name)
    return value


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    """The objects of a list, or the value itself if it is one (other values: none)."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):
            yield item


class _Scan:
    """Walks the request's content, noting what the gateway cannot measure from the body."""

    def __init__(self, metered: MeteredRequest) -> None:
        self.m = metered

    def unmeasured(self, why: str) -> None:
        if why not in self.m.unmeasured:
            self.m.unmeasured.append(why)

    def part(self, part: Any) -> None:
        if not isinstance(part, dict):
            return  # text, or a scalar no upstream reads as a reference
        kind = part.get("type")
        if kind is None and not _REFERENCE_KEYS.intersection(part):
            return  # a malformed part (the upstream's to refuse) that points at nothing
        if kind in _TEXT_PARTS:
            return
        if kind in _IMAGE_PARTS:
            self.m.images += 1
        elif kind in _AUDIO_PARTS:
            self.m.audio_input = True
            self.unmeasured("audio input")
        else:
            self.unmeasured(f"content part {kind!r}" if isinstance(kind, str) else "content part")

    def content(self, content: Any) -> None:
        for part in content if isinstance(content, list) else [content]:
            self.part(part)

    def chat_messages(self, messages: Any) -> None:
        for message in _objects(messages):
            if any(k not in _MESSAGE_KEYS for k in message):
                self.unmeasured("message field")  # e.g. an assistant `audio` reference
            self.content(message.get("content"))

    def responses_input(self, items: Any) -> None:
        for item in _objects(items):
            kind = item.get("type")
            if kind is None:
                by_reference = "role" not in item and _REFERENCE_KEYS.intersection(item)
                kind = "item reference" if by_reference else "message"
            if kind not in _INLINE_ITEMS:
                self.unmeasured(f"input item {kind!r}")
            elif kind == "message":
                self.content(item.get("content"))
            elif kind in ("function_call_output", "custom_tool_call_output"):
                self.content(item.get("output"))

    def anthropic_blocks(self, content: Any) -> None:
        for block in _objects(content):
            kind = block.get("type")
            if kind is None and not _REFERENCE_KEYS.intersection(block):
                continue
            if kind in _INLINE_BLOCKS:
                continue
            if kind == "image":
                self.m.images += 1
            elif kind == "tool_result":
                self.anthropic_blocks(block.get("content"))
            else:
                self.unmeasured(f"content block {kind!r}")


def _server_tools(body: dict[str, Any], endpoint: str) -> list[dict[str, Any]]:
    """Tools the upstream runs itself (each call may carry a fee and adds input the gateway
    cannot see); anything not known to be a client-side function counts."""
    tools = body.get("tools")
    server = []
    # A malformed tools value defines no tool (the upstream's to refuse).
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if endpoint == "/messages" and kind is None:
            continue  # Anthropic's client tools have no type
        if kind not in _CLIENT_TOOLS:
            server.append(tool)
    return server


def _tool_calls(body: dict[str, Any], endpoint: str, default_calls: int) -> tuple[int, bool]:
    """How many fee-bearing calls the request may make, and whether the body changed (the
    default `max_tool_calls` / `max_uses` written into it)."""
    server = _server_tools(body, endpoint)
    changed = False
    if endpoint == "/responses":
        if not server:
            return 0, False
        calls = _bounded_int(body, "max_tool_calls", 0, MAX_TOKENS_LIMIT)
        if calls is None:
            body["max_tool_calls"] = calls = default_calls
            changed = True
        return calls, changed
    if endpoint == "/messages":
        calls = 0
        for tool in server:
            kind = str(tool.get("type"))
            if kind.startswith(("web_search", "web_fetch")):
                uses = _bounded_int(tool, "max_uses", 1, MAX_TOKENS_LIMIT)
                if uses is None:
                    tool["max_uses"] = uses = default_calls
                    changed = True
                calls += uses
            else:
                calls += default_calls  # no per-tool cap in the API: the default count
        if body.get("mcp_servers"):
            calls += default_calls
        return calls, changed
    # Chat: no cap field; a web search (web_search_options, or a server tool LiteLLM
    # translates) may run up to the default count.
    if server or body.get("web_search_options") is not None:
        return default_calls, False
    return 0, False


def _prompt_count(prompt: Any) -> int:
    """Legacy /completions: each prompt (string or token list) gets its own completions."""
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return len(prompt)
    return 1


def parse_metered(
    endpoint: str, raw: bytes, settings: Settings, path_model: str | None = None
) -> MeteredRequest:
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
                f"the body's model {model!r} differs from the path's {path_model!r}",
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

    metered = MeteredRequest(
        endpoint=endpoint,
        model=model,
        stream=stream,
        body=raw,
        input_bound=len(raw),
        output_bound=0,
        client_wants_usage=True,
    )
    metered.end_user = body.get("user")
    metadata = body.get("metadata")
    metered.tags = metadata.get("tags") if isinstance(metadata, dict) else None
    # Anthropic writes a 1-hour cache only when a cache_control asks for it (ttl "1h").
    metered.long_cache_writes = b'"1h"' in raw
    changed = False
    fields = OUTPUT_FIELDS.get(endpoint, ())
    if fields:
        named = {f: _bounded_int(body, f, 0, MAX_TOKENS_LIMIT) for f in fields}
        bounds = {f: b for f, b in named.items() if b is not None}
        for name, value in bounds.items():
            if value == 0:
                # Many upstreams read 0 as "unset" (no limit): it bounds nothing.
                raise InvalidField(f"{name} must be at least 1", param=name)
        if bounds:
            metered.output_field, metered.output_bound = max(bounds.items(), key=lambda x: x[1])
        else:
            # No bound named: set the default, so the upstream stops where the bound does.
            metered.output_field = fields[-1]
            metered.output_bound = body[fields[-1]] = settings.default_max_output_tokens
            changed = True

    scan = _Scan(metered)
    n = _bounded_int(body, "n", 1, MAX_MULTIPLIER) or 1
    if endpoint == "/chat/completions":
        metered.samplings = n
        scan.chat_messages(body.get("messages"))
        modalities = body.get("modalities")
        metered.audio_output = body.get("audio") is not None or (
            isinstance(modalities, list) and "audio" in modalities
        )
        prediction = body.get("prediction")
        if prediction is not None:
            metered.prediction_bound = len(orjson.dumps(prediction))
    elif endpoint == "/completions":
        best_of = _bounded_int(body, "best_of", 1, MAX_MULTIPLIER) or 1
        metered.samplings = _prompt_count(body.get("prompt")) * max(n, best_of)
    elif endpoint == "/responses":
        scan.responses_input(body.get("input"))
    elif endpoint == "/messages":
        scan.anthropic_blocks(body.get("system"))
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, dict):
                scan.anthropic_blocks(message.get("content"))
    elif endpoint == "/embeddings":
        # Objects are multimodal inputs (images, documents), read as content parts are.
        scan.content(body.get("input"))
    elif endpoint == "/images/generations":
        metered.samplings = n
        for name in ("size", "quality"):
            given = body.get(name)
            if given is not None and not isinstance(given, str):
                raise InvalidField(f"{name} must be a string", param=name)
        metered.image_size, metered.image_quality = body.get("size"), body.get("quality")
    elif endpoint == "/audio/speech":
        text = body.get("input")
        if not isinstance(text, str):
            raise InvalidField("input must be a string", param="input")
        metered.characters = len(text)
    for name in _STORED_CONTEXT:
        if body.get(name) is not None and endpoint in ("/responses", "/messages"):
            scan.unmeasured(name)
    if endpoint in ("/responses", "/chat/completions", "/messages"):
        metered.tool_calls, tools_changed = _tool_calls(
            body, endpoint, settings.default_max_tool_calls
        )
        changed |= tools_changed
        metered.image_tool = any(
            t.get("type") == "image_generation" for t in _server_tools(body, endpoint)
        )
        if metered.tool_calls:
            scan.unmeasured("server-side tool results")

    if stream and endpoint in ("/chat/completions", "/completions"):
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidField("stream_options must be an object", param="stream_options")
        metered.client_wants_usage = bool(options and options.get("include_usage") is True)
        if not metered.client_wants_usage:
            body["stream_options"] = {**(options or {}), "include_usage": True}
            changed = True

    if changed:
        metered.body = orjson.dumps(body)
    return metered


def set_output_bound(metered: MeteredRequest, tokens: int) -> None:
    """Lower the forwarded output bound to `tokens` (shrink to fit): every output field the body
    names is lowered, so that no upstream reads a larger one; the body is re-serialised."""
    if metered.output_field is None:
        raise ValueError("this request has no output bound")
    body = orjson.loads(metered.body)
    for name in OUTPUT_FIELDS[metered.endpoint]:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > tokens:
            body[name] = tokens
    metered.body = orjson.dumps(body)
    metered.output_bound = tokens
