"""Token usage from upstream answers: whole JSON bodies, and SSE streams read as they pass.

Formats: OpenAI chat/completions/embeddings (`usage.prompt_tokens`/`completion_tokens`,
streamed in a final usage-only chunk), OpenAI Responses (`usage.input_tokens`/`output_tokens`,
streamed in `response.completed`), Anthropic Messages (`message_start` then `message_delta`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from app.pricing.usage import Usage

__all__ = ["StreamMeter", "Usage", "count_fee_items", "usage_from_body", "usage_from_object"]


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# /responses output items that carry a per-call fee, and the Usage count each one adds to.
_FEE_ITEMS = {
    "web_search_call": "web_searches",
    "file_search_call": "file_searches",
    "code_interpreter_call": "code_executions",
    "image_generation_call": "images_generated",
}


def usage_from_object(usage: Any) -> Usage | None:
    """Either naming scheme, with the categories that have their own prices: OpenAI chat
    (`prompt_tokens_details`, `completion_tokens_details`), Responses (`input_tokens_details`,
    `output_tokens_details`), Anthropic (cache tokens reported beside input: added to it)."""
    if not isinstance(usage, dict):
        return None
    searches = _int(_dict(usage.get("server_tool_use")).get("web_search_requests"))
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        # Gemini's OpenAI route may leave thoughts out of completion_tokens but not the total.
        completion = max(completion, _int(usage.get("total_tokens")) - prompt)
        details = _dict(usage.get("prompt_tokens_details"))
        out = _dict(usage.get("completion_tokens_details"))
        return Usage(
            prompt,
            completion,
            cache_read_tokens=_int(details.get("cached_tokens")),
            # LiteLLM reports Anthropic's cache writes here, or beside, under Anthropic's name.
            cache_write_tokens=_int(details.get("cache_write_tokens"))
            or _int(details.get("cache_creation_tokens"))
            or _int(usage.get("cache_creation_input_tokens")),
            input_audio_tokens=_int(details.get("audio_tokens")),
            output_audio_tokens=_int(out.get("audio_tokens")),
            reasoning_tokens=_int(out.get("reasoning_tokens")),
            web_searches=searches,
        )
    if "input_tokens" in usage or "output_tokens" in usage:
        details = _dict(usage.get("input_tokens_details"))
        out = _dict(usage.get("output_tokens_details"))
        created = _int(usage.get("cache_creation_input_tokens"))
        split = _dict(usage.get("cache_creation"))
        write_1h = min(_int(split.get("ephemeral_1h_input_tokens")), created)
        read = _int(usage.get("cache_read_input_tokens"))
        return Usage(
            _int(usage.get("input_tokens")) + created + read,
            _int(usage.get("output_tokens")),
            cache_read_tokens=read + _int(details.get("cached_tokens")),
            cache_write_tokens=created - write_1h + _int(details.get("cache_write_tokens")),
            cache_write_1h_tokens=write_1h,
            reasoning_tokens=_int(out.get("reasoning_tokens")) or _int(out.get("thinking_tokens")),
            web_searches=searches,
        )
    return None


def count_fee_items(usage: Usage, items: Any) -> Usage:
    """The usage with the fee-bearing tool calls among /responses output items counted (the
    usage object does not count them)."""
    counts = dict.fromkeys(_FEE_ITEMS.values(), 0)
    for item in items if isinstance(items, list) else ():
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in _FEE_ITEMS:
            counts[_FEE_ITEMS[kind]] += 1
    return replace(usage, **{k: max(v, getattr(usage, k)) for k, v in counts.items()})


def usage_from_body(data: Any) -> tuple[Usage | None, str | None]:
    """Usage and model of a non-streamed answer."""
    if not isinstance(data, dict):
        return None, None
    model = data.get("model") if isinstance(data.get("model"), str) else None
    usage = usage_from_object(data.get("usage"))
    if usage is not None and "output" in data:
        usage = count_fee_items(usage, data["output"])
    return usage, model


def _carries_content(choices: Any) -> bool:
    """Whether any choice has something for the client: text, a tool call, a finish reason.
    (OpenAI's usage chunk has `choices: []`; LiteLLM's has one choice with an empty delta.)"""
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") is not None or choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role"):
            return True
    return False


class StreamMeter:
    """Reads an SSE stream chunk by chunk: forwards complete events unchanged, except the
    usage-only chunk when the client did not ask for it, and remembers usage, model and how
    much content went out (for the estimate when no usage arrives)."""

    def __init__(self, drop_usage_chunk: bool) -> None:
        self.drop_usage_chunk = drop_usage_chunk
        self.usage: Usage | None = None
        self.model: str | None = None
        self.content_events = 0
        self.content_chars = 0
        self.completed = False  # saw [DONE], response.completed or message_stop
        self._buffer = b""
        self.calls = Usage(0, 0)  # fee-bearing tool calls seen in output items
        # True while the only usage seen is Anthropic's message_start (input known, output a
        # placeholder): not the final count, so a stream cut there is charged an estimate.
        self.usage_partial = False

    def feed(self, chunk: bytes) -> bytes:
        """Returns the bytes to forward now (possibly empty)."""
        data = self._buffer + chunk
        if b"\r" in data:
            # CRLF-delimited SSE (e.g. sse-starlette servers): normalise before looking for
            # event boundaries, or no event is ever seen (whole stream buffered, usage lost).
            # A "\r" left at the end stays in the buffer and pairs with the next chunk's "\n".
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data
            return b""
        complete, self._buffer = data[: end + 2], data[end + 2 :]
        out = []
        for event in complete.split(b"\n\n"):
            forwarded = self._inspect(event) if event else None
            if forwarded is not None:
                out.append(forwarded + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest

    def _inspect(self, event: bytes) -> bytes | None:
        """Meters one event; returns what reaches the client (None: nothing)."""
        payload = None
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                payload = line[5:].strip()
        if payload is None:
            return event
        if payload == b"[DONE]":
            self.completed = True
            return event
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        kind = obj.get("type")
        if kind is None or kind in ("chat.completion.chunk", "text_completion"):
            if self._openai_chunk(obj) and self.drop_usage_chunk:
                if not _carries_content(obj.get("choices")):
                    return None
                # Usage merged into a content chunk: keep the content, hide the usage.
                obj["usage"] = None
                return b"data: " + orjson.dumps(obj)
            return event
        if isinstance(kind, str):
            self._typed_event(kind, obj)
        return event

    def _openai_chunk(self, obj: dict[str, Any]) -> bool:
        """Meters an OpenAI chunk; True when it carries usage."""
        if self.model is None and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        usage = usage_from_object(obj.get("usage"))
        choices = obj.get("choices")
        if usage is not None:
            self.usage = usage
        if choices:
            self.content_events += 1
            for choice in choices if isinstance(choices, list) else ():
                if isinstance(choice, dict):
                    delta = choice.get("delta")
                    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                    self.content_chars += len(text) if isinstance(text, str) else 0
        return usage is not None

    def _typed_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            response = _dict(obj.get("response"))
            usage = usage_from_object(response.get("usage"))
            if usage is not None:
                self.usage = count_fee_items(usage, response.get("output")).merged(self.calls)
            if isinstance(response.get("model"), str):
                self.model = response["model"]
            # A failed response is billed for what it used, but it is not a complete answer.
            self.completed = kind != "response.failed"
        elif kind == "response.created":
            response = _dict(obj.get("response"))
            if isinstance(response.get("model"), str):
                self.model = response["model"]
        elif kind == "response.output_item.done":
            self.calls = count_fee_items(self.calls, [obj.get("item")])
        elif kind.endswith(".delta") or kind == "content_block_delta":
            self.content_events += 1
            delta = obj.get("delta")
            text = delta.get("text") if isinstance(delta, dict) else delta
            self.content_chars += len(text) if isinstance(text, str) else 0
        elif kind == "message_start":
            message = _dict(obj.get("message"))
            if isinstance(message.get("model"), str):
                self.model = message["model"]
            start = usage_from_object(message.get("usage"))
            if start is not None:
                self.usage = start
                self.usage_partial = True
        elif kind == "message_delta":
            delta = usage_from_object(obj.get("usage"))
            if delta is not None:
                # message_delta carries cumulative counts (output, and newer servers repeat the
                # input and cache counts); message_start had the input.
                self.usage = self.usage.merged(delta) if self.usage is not None else delta
                self.usage_partial = False
        elif kind == "message_stop":
            self.completed = True

    def fallback_usage(self, input_tokens: int) -> Usage:
        """What to charge when no final usage arrived: the input given (or the start's), the
        output estimated from what was forwarded, and the tool calls seen."""
        output = self.estimated_output_tokens()
        if self.usage is not None:  # cut after message_start: its output is a placeholder
            base = replace(self.usage, completion_tokens=max(self.usage.completion_tokens, output))
        else:
            base = Usage(input_tokens, output)
        return base.merged(self.calls)

    def estimated_output_tokens(self) -> int:
        """An estimate of the tokens delivered: one per content event, or one per three
        characters of content, whichever is larger (errs towards charging)."""
        return max(self.content_events, -(-self.content_chars // 3))
