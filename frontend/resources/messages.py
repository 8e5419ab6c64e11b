"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the request pipeline."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NamedTuple

import falcon

from frontend import pipeline, sse
from frontend.anthropic_protocol import CountTokensRequest, MessagesInput, MessagesRequest, tool_use_input
from frontend.anthropic_shapes import (
    STOP_REASONS,
    AnthropicError,
    ContentBlock,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    CountTokensResponse,
    InputJSONDelta,
    Message,
    MessageDelta,
    MessageDeltaBody,
    MessageStart,
    MessageStop,
    MessageStreamEvent,
    MessageUsage,
    Ping,
    StopReason,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
)
from frontend.context import AppContext
from frontend.errors import invalid_request
from frontend.generation import FinishedChoice
from frontend.openapi import GENERATION_ERRORS, Operation
from frontend.reasoning import thinking_switch
from frontend.request_body import read_request
from frontend.shapes import Shape
from frontend.tokenization import ChatTemplateError
from frontend.tools import ToolCall, ToolPlan

# Routes whose errors take Anthropic's shape.
PATH_PREFIX = "/v1/messages"


class Prompt(NamedTuple):
    ids: list[int]
    prefilled: bool  # the last message is the start of the answer, which the output continues


def _prompt(ctx: AppContext, request: MessagesInput, tools: ToolPlan) -> Prompt:
    tok = ctx.tokenization
    thinking = thinking_switch(
        request.thinking_enabled(), thinks=tok.has_thinking, can_toggle=tok.can_toggle_thinking, param="thinking"
    )
    messages = request.template_messages()
    # Anthropic's prefill: a last assistant message (text only) is where the answer starts.
    last = messages[-1]
    prefill = last["content"] if last["role"] == "assistant" and not last.get("tool_calls") else ""
    if prefill:
        messages.pop()
    try:
        ids = tok.render_chat(messages, tools=tools.template_tools, thinking=thinking)
    except ChatTemplateError as exc:
        raise invalid_request(str(exc), param="messages") from None
    return Prompt(ids + tok.encode_continuation(prefill) if prefill else ids, bool(prefill))


def pipeline_request(ctx: AppContext, request: MessagesRequest) -> pipeline.PipelineRequest:
    model, tok = ctx.engine.model, ctx.tokenization
    request.check_supported()
    stops = request.stop_strings()
    tools = request.tool_plan(model, tok.marker_token_id)
    constraint = tools.constraint or request.answer_constraint()
    prompt = _prompt(ctx, request, tools)
    return pipeline.PipelineRequest(
        prompts=[prompt.ids],
        prompt_param="messages",
        id_prefix="msg",
        sampling=request.sampling(model.vocab_size),
        max_tokens=request.max_tokens,
        stops=stops,
        constraint=constraint,
        tools=tools,
        trim_leading_space=not prompt.prefilled,  # a continuation keeps its space ("is" + " Paris")
    )


# ---------------------------------------------------------------- the message


def message_id(generation: pipeline.Generation) -> str:
    return "msg_" + generation.response_id.removeprefix("msg-")


def _tool_use(call: ToolCall) -> ToolUseBlock:
    return ToolUseBlock(
        type="tool_use",
        id="toolu_" + call.id.removeprefix("call_"),
        name=call.name,
        input=tool_use_input(call.arguments),
    )


def _stop(generation: pipeline.Generation, index: int, reason: str) -> tuple[StopReason, str | None]:
    stop_sequence = generation.runs[index].stop_sequence
    return ("stop_sequence", stop_sequence) if stop_sequence is not None else (STOP_REASONS[reason], None)


def _content(choice: FinishedChoice) -> list[ContentBlock]:
    blocks: list[ContentBlock] = []
    if choice.reasoning:
        blocks.append(ThinkingBlock(type="thinking", thinking=choice.reasoning, signature=""))
    if choice.text or not choice.tool_calls:
        blocks.append(TextBlock(type="text", text=choice.text))
    blocks += [_tool_use(call) for call in choice.tool_calls or []]
    return blocks


def message(generation: pipeline.Generation, outcome: pipeline.Outcome) -> Message:
    [choice] = outcome.choices
    stop_reason, stop_sequence = _stop(generation, choice.index, choice.finish_reason)
    return Message(
        id=message_id(generation),
        type="message",
        role="assistant",
        model=generation.model_id,
        content=_content(choice),
        stop_reason=stop_reason,
        stop_sequence=stop_sequence,
        usage=MessageUsage.of(*outcome.usage),
    )


# ---------------------------------------------------------------- the stream


def _event(payload: Shape) -> bytes:
    return sse.event(payload, payload.type)  # type: ignore[attr-defined]


class MessagesStream:
    """Pipeline events as Anthropic's named events: message_start, then each
    content block (start, deltas, stop; ping after the first start), then
    message_delta and message_stop; a failure ends with an ``error`` event."""

    def __init__(self, generation: pipeline.Generation, prompt_tokens: int) -> None:
        self._generation = generation
        self._prompt_tokens = prompt_tokens
        self._blocks = 0  # content blocks started
        self._open: str | None = None  # the type of the block open now
        self._stop: tuple[StopReason, str | None] = ("end_turn", None)

    def started(self, event: pipeline.Started) -> Iterable[bytes]:
        usage = MessageUsage.of(self._prompt_tokens, 0, 0)  # the cached count is known at the end (message_delta)
        message = Message(
            id=message_id(self._generation),
            type="message",
            role="assistant",
            model=self._generation.model_id,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=usage,
        )
        return [_event(MessageStart(type="message_start", message=message))]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [_event(ContentBlockStop(type="content_block_stop", index=self._blocks - 1))]

    def _start(self, block: ContentBlock) -> list[bytes]:
        out = self._close()
        out.append(_event(ContentBlockStart(type="content_block_start", index=self._blocks, content_block=block)))
        if self._blocks == 0:
            out.append(_event(Ping(type="ping")))
        self._blocks += 1
        self._open = block.type
        return out

    def _delta(self, delta: Any) -> bytes:
        return _event(ContentBlockDelta(type="content_block_delta", index=self._blocks - 1, delta=delta))

    def delta(self, event: pipeline.Delta) -> Iterable[bytes]:
        piece, out = event.piece, []
        if piece.reasoning:
            if self._open != "thinking":
                out += self._start(ThinkingBlock(type="thinking", thinking="", signature=""))
            out.append(self._delta(ThinkingDelta(type="thinking_delta", thinking=piece.reasoning)))
        if piece.text:
            if self._open != "text":
                out += self._start(TextBlock(type="text", text=""))
            out.append(self._delta(TextDelta(type="text_delta", text=piece.text)))
        for call in piece.tool_calls or []:
            # Each call whole: its start block, all of its input in one delta, its stop.
            block = _tool_use(call)
            out += self._start(block.model_copy(update={"input": {}}))
            out.append(self._delta(InputJSONDelta(type="input_json_delta", partial_json=json.dumps(block.input))))
            out += self._close()
        return out

    def finished(self, event: pipeline.Finished) -> Iterable[bytes]:
        self._stop = _stop(self._generation, event.index, event.reason)
        # An empty answer is one empty text block, as the non-streamed message has it.
        out = self._start(TextBlock(type="text", text="")) if self._blocks == 0 else []
        return out + self._close()

    def completed(self, event: pipeline.Completed) -> Iterable[bytes]:
        stop_reason, stop_sequence = self._stop
        body = MessageDeltaBody(stop_reason=stop_reason, stop_sequence=stop_sequence)
        return [
            _event(MessageDelta(type="message_delta", delta=body, usage=MessageUsage.of(*event.usage))),
            _event(MessageStop(type="message_stop")),
        ]

    def failed(self, event: pipeline.Failed) -> Iterable[bytes]:
        return [_event(AnthropicError.of(event.error.status, event.error.message))]

    def waiting(self, event: pipeline.Waiting) -> Iterable[bytes]:
        # Anthropic's own keep-alive, which its SDKs read and skip.
        return [_event(Ping(type="ping"))]


# ---------------------------------------------------------------- resources

_ERRORS = (*GENERATION_ERRORS, 404)


class MessagesResource:
    openapi = {
        "post": Operation(
            "Anthropic Messages: create a message",
            request=MessagesRequest,
            response=Message,
            stream=MessageStreamEvent,
            errors=_ERRORS,
            error=AnthropicError,
            named_events=True,
        )
    }

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = self._ctx
        request = read_request(req, MessagesRequest, ctx.settings.max_request_bytes)
        checked = pipeline.plan(ctx, pipeline_request(ctx, request))
        generation = pipeline.start(ctx, checked)
        pipeline.respond(
            req,
            resp,
            generation,
            stream=bool(request.stream),
            wire=MessagesStream(generation, len(checked.request.prompts[0])),
            body_of=lambda outcome: message(generation, outcome),
        )


class CountTokensResource:
    openapi = {
        "post": Operation(
            "Anthropic Messages: count a request's input tokens",
            request=CountTokensRequest,
            response=CountTokensResponse,
            errors=(400, 401, 413),
            error=AnthropicError,
        )
    }

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = self._ctx
        request = read_request(req, CountTokensRequest, ctx.settings.max_request_bytes)
        request.check_supported()
        prompt = _prompt(ctx, request, request.tool_plan(ctx.engine.model, ctx.tokenization.marker_token_id))
        resp.content_type = falcon.MEDIA_JSON
        resp.data = CountTokensResponse(input_tokens=len(prompt.ids)).dump()


class AnthropicErrors:
    """Middleware: errors on the Messages routes in Anthropic's shape
    (``{"type": "error", "error": {"type", "message"}}``), whoever raised them
    (a gate, the body reader, a resource, Falcon itself)."""

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if not req.path.startswith(PATH_PREFIX) or resp.status_code < 400 or not resp.data:
            return
        try:
            error = json.loads(resp.data)["error"]
            message, param = error["message"], error.get("param")
        except (ValueError, KeyError, TypeError):
            return
        if param and param not in message:
            message = f"{param}: {message}"  # Anthropic's errors have no param field
        resp.data = AnthropicError.of(resp.status_code, message).dump()
