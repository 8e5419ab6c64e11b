"""OpenAI's response shapes (chat, completions, models): each class serialises the
bodies we send and is their schema in /openapi.json."""

from __future__ import annotations

from typing import Literal

from frontend.shapes import Shape

# Why a choice ended, as OpenAI names it.
ChatFinishReason = Literal["stop", "length", "tool_calls"]
CompletionFinishReason = Literal["stop", "length"]
OWNED_BY = "mlx-server"


class PromptTokensDetails(Shape):
    cached_tokens: int


class CompletionTokensDetails(Shape):
    reasoning_tokens: int


class Usage(Shape):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = None  # a thinking model's chat only

    @classmethod
    def of(
        cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int, *, reasoning_tokens: int | None = None
    ) -> Usage:
        details = (
            {}
            if reasoning_tokens is None
            else {"completion_tokens_details": CompletionTokensDetails(reasoning_tokens=reasoning_tokens)}
        )
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            **details,
        )


# ---------------------------------------------------------------- logprobs


class TopLogprob(Shape):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Shape):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Shape):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None


class CompletionLogprobs(Shape):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


# ---------------------------------------------------------------- chat completions


class FunctionCall(Shape):
    name: str
    arguments: str  # JSON text


class ToolCall(Shape):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(Shape):
    """A whole call in one stream delta (clients that join argument fragments get the same)."""

    index: int
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(Shape):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCall] | None = None
    # A thinking model's reasoning, apart from content (absent when there is none):
    # vLLM's name and the newer one, the same text.
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChoice(Shape):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: ChatFinishReason


class ChatCompletion(Shape):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Shape):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChunkChoice(Shape):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: ChatFinishReason | None


class ChatCompletionChunk(Shape):
    """One server-sent event of a streamed chat completion (the last: usage, no choices)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- completions


class CompletionChoice(Shape):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: CompletionFinishReason | None  # null in stream chunks before the last


class Completion(Shape):
    """A text completion, or one server-sent event of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- models


class ModelCard(Shape):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int
    max_model_len: int  # vLLM's name for context_length
    adapter: str | None
    path: str


class ModelList(Shape):
    object: Literal["list"]
    data: list[ModelCard]
