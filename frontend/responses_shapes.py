"""OpenAI Responses API shapes (the response object, its output items, its stream events),
as OpenAI's OpenAPI document defines them: each class serialises what we send and is its
schema in /openapi.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import RootModel

from frontend.openai_shapes import TokenLogprob
from frontend.shapes import Shape

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


# ---------------------------------------------------------------- output items


class OutputText(Shape):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]  # always empty: no citations here
    logprobs: list[TokenLogprob]  # empty unless asked for (include, top_logprobs)


class ReasoningText(Shape):
    type: Literal["reasoning_text"]
    text: str


class OutputMessage(Shape):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[OutputText]
    status: ItemStatus


class FunctionCallItem(Shape):
    id: str
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    status: ItemStatus


class ReasoningItem(Shape):
    id: str
    type: Literal["reasoning"]
    summary: list[Any]  # always empty: the model's own reasoning is in content
    content: list[ReasoningText]
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallItem | ReasoningItem
ContentPart = OutputText | ReasoningText


# ---------------------------------------------------------------- the response object


class InputTokensDetails(Shape):
    cached_tokens: int  # from the prefix cache
    cache_write_tokens: int


class OutputTokensDetails(Shape):
    reasoning_tokens: int


class ResponseUsage(Shape):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Shape):
    reason: Literal["max_output_tokens"]


class ResponseError(Shape):
    code: Literal["server_error", "rate_limit_exceeded"]
    message: str


class ReasoningEcho(Shape):
    effort: str | None
    summary: str | None


class TextEcho(Shape):
    format: dict[str, Any]


class Response(Shape):
    id: str
    object: Literal["response"]
    created_at: int
    completed_at: int | None
    status: ResponseStatus
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None = None  # left out until the response ends (the document has it non-null)
    # What the request asked, echoed as OpenAI does.
    instructions: str | None
    max_output_tokens: int | None
    previous_response_id: None
    temperature: float | None
    top_p: float | None
    parallel_tool_calls: bool
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    text: TextEcho
    reasoning: ReasoningEcho
    truncation: Literal["disabled"]
    store: bool
    metadata: dict[str, str]
    user: str | None = None  # left out unless given (the document has it non-null)


# ---------------------------------------------------------------- stream events


class ResponseLifecycleEvent(Shape):
    """response.created / in_progress / completed / incomplete / failed."""

    type: Literal[
        "response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed"
    ]
    sequence_number: int
    response: Response


class OutputItemEvent(Shape):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(Shape):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: ContentPart


class OutputTextDeltaEvent(Shape):
    type: Literal["response.output_text.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[TokenLogprob]


class OutputTextDoneEvent(Shape):
    type: Literal["response.output_text.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[TokenLogprob]


class ReasoningTextDeltaEvent(Shape):
    type: Literal["response.reasoning_text.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningTextDoneEvent(Shape):
    type: Literal["response.reasoning_text.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


class FunctionCallArgumentsDeltaEvent(Shape):
    type: Literal["response.function_call_arguments.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(Shape):
    type: Literal["response.function_call_arguments.done"]
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(Shape):
    type: Literal["error"]
    sequence_number: int
    code: str | None
    message: str
    param: str | None


StreamEvent = (
    ResponseLifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | OutputTextDeltaEvent
    | OutputTextDoneEvent
    | ReasoningTextDeltaEvent
    | ReasoningTextDoneEvent
    | FunctionCallArgumentsDeltaEvent
    | FunctionCallArgumentsDoneEvent
    | ErrorEvent
)


class ResponseStreamEvent(RootModel[StreamEvent]):
    """Any one event of a streamed response (its ``type`` is also the SSE event name); for /openapi.json."""
