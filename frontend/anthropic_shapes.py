"""Anthropic Messages response shapes: the message, the stream's named events, errors, token counts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, RootModel

from frontend.shapes import Shape

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
# Our finish reasons -> Anthropic's stop_reason ("stop" is end_turn unless a stop sequence matched).
STOP_REASONS: dict[str, StopReason] = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# HTTP status -> Anthropic's error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class TextBlock(Shape):
    type: Literal["text"]
    text: str


class ThinkingBlock(Shape):
    type: Literal["thinking"]
    thinking: str
    signature: str  # Anthropic's proof of its own thinking: empty here, clients send it back as is


class ToolUseBlock(Shape):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = Annotated[TextBlock | ThinkingBlock | ToolUseBlock, Field(discriminator="type")]


class MessageUsage(Shape):
    input_tokens: int  # prompt tokens not read from the prefix cache
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, output_tokens: int, cached_tokens: int) -> MessageUsage:
        return cls(
            input_tokens=prompt_tokens - cached_tokens,
            output_tokens=output_tokens,
            cache_creation_input_tokens=0,
            cache_read_input_tokens=cached_tokens,
        )


class Message(Shape):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessageUsage


class CountTokensResponse(Shape):
    input_tokens: int


class AnthropicErrorDetail(Shape):
    type: str
    message: str


class AnthropicError(Shape):
    """An error body, and the ``error`` event that ends a stream failing after its headers."""

    type: Literal["error"]
    error: AnthropicErrorDetail

    @classmethod
    def of(cls, status: int, message: str) -> AnthropicError:
        kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return cls(type="error", error=AnthropicErrorDetail(type=kind, message=message))


# ---------------------------------------------------------------- stream events


class MessageStart(Shape):
    type: Literal["message_start"]
    message: Message


class ContentBlockStart(Shape):
    type: Literal["content_block_start"]
    index: int
    content_block: ContentBlock


class Ping(Shape):
    type: Literal["ping"]


class TextDelta(Shape):
    type: Literal["text_delta"]
    text: str


class ThinkingDelta(Shape):
    type: Literal["thinking_delta"]
    thinking: str


class InputJSONDelta(Shape):
    type: Literal["input_json_delta"]
    partial_json: str


class ContentBlockDelta(Shape):
    type: Literal["content_block_delta"]
    index: int
    delta: Annotated[TextDelta | ThinkingDelta | InputJSONDelta, Field(discriminator="type")]


class ContentBlockStop(Shape):
    type: Literal["content_block_stop"]
    index: int


class MessageDeltaBody(Shape):
    stop_reason: StopReason
    stop_sequence: str | None


class MessageDelta(Shape):
    type: Literal["message_delta"]
    delta: MessageDeltaBody
    usage: MessageUsage


class MessageStop(Shape):
    type: Literal["message_stop"]


StreamEventShape = (
    MessageStart
    | ContentBlockStart
    | Ping
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
    | AnthropicError
)


class MessageStreamEvent(RootModel[Annotated[StreamEventShape, Field(discriminator="type")]]):
    """One server-sent event of a streamed message: ``event: <type>`` then ``data: <this>``."""
