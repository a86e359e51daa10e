"""What an upstream reports it billed for one request, by category (SPEC 10: the charge uses
the usage's own categories at their own prices)."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Usage"]


@dataclass(slots=True)
class Usage:
    """Token counts and tool calls of one answer.

    ``prompt_tokens`` is all input (cached reads and cache writes included, as OpenAI reports
    it; Anthropic's parts are added up when parsed) and ``completion_tokens`` all output
    (reasoning and audio included). The other token counts are parts of those two that have
    their own prices; the tool counts are calls that carry a per-call fee.
    """

    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0  # 5-minute (or unspecified) cache writes
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    reasoning_tokens: int = 0
    web_searches: int = 0
    file_searches: int = 0
    code_executions: int = 0
    images_generated: int = 0  # by a server-side image tool (/v1/responses image_generation)

    def is_plain(self) -> bool:
        """Only input and output tokens: priced by the compiled price function (fast path)."""
        return not (
            self.cache_read_tokens
            or self.cache_write_tokens
            or self.cache_write_1h_tokens
            or self.input_audio_tokens
            or self.output_audio_tokens
            or self.reasoning_tokens
            or self.tool_calls()
        )

    def tool_calls(self) -> int:
        return self.web_searches + self.file_searches + self.code_executions + self.images_generated

    def merged(self, later: Usage) -> Usage:
        """Counts of a later report of the same answer: each the larger of the two (stream
        events repeat cumulative counts, and a later one may omit what an earlier one had)."""
        return Usage(*(max(getattr(self, f.name), getattr(later, f.name)) for f in fields(self)))
