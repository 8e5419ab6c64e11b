"""POST /v1/responses: OpenAI's Responses API over the request pipeline.

One response is one choice. Its output items, in the order the model writes
them: a ``reasoning`` item (a thinking model's reasoning), a ``message`` with
one ``output_text`` part, ``function_call`` items. Streamed, each item is
announced (``output_item.added``), filled by deltas and closed
(``output_item.done``) between ``response.created``/``in_progress`` and one
final ``response.completed``/``incomplete``/``failed``; every event is a
named SSE event with a ``sequence_number``, and there is no ``[DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import falcon

from frontend import pipeline, sse
from frontend.context import AppContext
from frontend.errors import APIError, invalid_request
from frontend.generation import FinishedChoice, TokenLogprob
from frontend.logprobs import token_logprobs
from frontend.openai_shapes import TokenLogprob as TokenLogprobShape
from frontend.openapi import GENERATION_ERRORS, Operation
from frontend.reasoning import effort_switch
from frontend.request_body import read_request
from frontend.responses_protocol import ResponsesRequest
from frontend.responses_shapes import (
    ContentPartEvent,
    ErrorEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    OutputTokensDetails,
    ReasoningEcho,
    ReasoningItem,
    ReasoningText,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    Response,
    ResponseError,
    ResponseLifecycleEvent,
    ResponseStreamEvent,
    ResponseUsage,
    TextEcho,
)
from frontend.tokenization import ChatTemplateError, Tokenization
from frontend.tools import ToolCall


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def pipeline_request(ctx: AppContext, request: ResponsesRequest) -> pipeline.PipelineRequest:
    tok = ctx.tokenization
    request.check_supported()
    answer = request.answer_constraint()
    tools = request.tool_plan(ctx.engine.model, tok.marker_token_id, answer)
    try:
        prompt = tok.render_chat(
            request.messages(),
            tools=tools.template_tools,
            template_kwargs=request.template_kwargs(tok.template_mentions),
            thinking=effort_switch(request.effort, tok, "reasoning.effort"),
        )
    except ChatTemplateError as exc:
        raise invalid_request(str(exc), param="input") from None
    return pipeline.PipelineRequest(
        prompts=[prompt],
        prompt_param="input",
        id_prefix="resp",
        sampling=request.sampling(ctx.engine.model.vocab_size),
        max_tokens=request.max_output_tokens,
        constraint=tools.constraint or answer,
        logprobs=request.engine_logprobs,
        tools=tools,
    )


class ResponseBuilder:
    """The response object of one generation, at any point of its life."""

    def __init__(self, generation: pipeline.Generation, request: ResponsesRequest, tok: Tokenization) -> None:
        self._generation = generation
        self._request = request
        self._tok = tok
        self.id = "resp_" + generation.response_id.removeprefix("resp-")

    def usage(self, counts: pipeline.TokenCounts) -> ResponseUsage:
        # The reasoning parser counted the tokens it took as reasoning (None: nothing is split).
        reasoning_tokens = self._generation.reasoning_tokens() or 0
        return ResponseUsage(
            input_tokens=counts.prompt,
            input_tokens_details=InputTokensDetails(cached_tokens=counts.cached, cache_write_tokens=0),
            output_tokens=counts.completion,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=min(reasoning_tokens, counts.completion)),
            total_tokens=counts.prompt + counts.completion,
        )

    def response(
        self,
        status: str,
        output: list[OutputItem],
        usage: ResponseUsage | None = None,
        error: APIError | None = None,
    ) -> Response:
        request = self._request
        ended = status in ("completed", "incomplete")
        fields: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self._generation.created,
            "completed_at": int(time.time()) if ended else None,
            "status": status,
            "error": None if error is None else _response_error(error),
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            "model": self._generation.model_id,
            "output": output,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "previous_response_id": None,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "tool_choice": request.tool_choice or ("auto" if request.tools else "none"),
            "tools": request.echo_tools(),
            "text": TextEcho(format=request.echo_format()),
            "reasoning": ReasoningEcho(effort=request.effort, summary=None),
            "truncation": "disabled",
            "store": bool(request.store),
            "metadata": request.metadata or {},
        }
        if usage is not None:
            fields["usage"] = usage
        if request.user is not None:
            fields["user"] = request.user
        return Response(**fields)

    def body(self, outcome: pipeline.Outcome) -> Response:
        [choice] = outcome.choices
        items = _items(choice, self.logprobs(choice.text_logprobs))
        return self.response(_status(choice.finish_reason), items, self.usage(outcome.usage))

    def logprobs(self, tokens: list[TokenLogprob] | None) -> list[TokenLogprobShape]:
        """output_text.logprobs of these tokens (none when logprobs were not asked for)."""
        return token_logprobs(tokens or [], self._tok.token_entry)


def _status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _response_error(error: APIError) -> ResponseError:
    code: Any = "rate_limit_exceeded" if error.status == 429 else "server_error"
    return ResponseError(code=code, message=error.message)


def _output_text(text: str, logprobs: list[TokenLogprobShape] | None = None) -> OutputText:
    return OutputText(type="output_text", text=text, annotations=[], logprobs=logprobs or [])


def _reasoning_item(item_id: str, text: str, status: Any) -> ReasoningItem:
    content = [ReasoningText(type="reasoning_text", text=text)] if status != "in_progress" else []
    return ReasoningItem(id=item_id, type="reasoning", summary=[], content=content, status=status)


def _message_item(
    item_id: str, text: str | None, status: Any, logprobs: list[TokenLogprobShape] | None = None
) -> OutputMessage:
    content = [] if text is None else [_output_text(text, logprobs)]
    return OutputMessage(id=item_id, type="message", role="assistant", content=content, status=status)


def _call_item(item_id: str, call: ToolCall, arguments: str, status: Any) -> FunctionCallItem:
    return FunctionCallItem(
        id=item_id, type="function_call", call_id=call.id, name=call.name, arguments=arguments, status=status
    )


def _items(choice: FinishedChoice, text_logprobs: list[TokenLogprobShape]) -> list[OutputItem]:
    """A finished choice's output items (non-streaming)."""
    status = _status(choice.finish_reason)
    items: list[OutputItem] = []
    if choice.reasoning:
        # Cut while reasoning: the reasoning is what is incomplete.
        answered = bool(choice.text or choice.tool_calls)
        items.append(_reasoning_item(_item_id("rs"), choice.reasoning, "completed" if answered else status))
    if choice.text or not choice.tool_calls:
        items.append(_message_item(_item_id("msg"), choice.text, status, text_logprobs))
    items += [_call_item(_item_id("fc"), call, call.arguments, "completed") for call in choice.tool_calls or []]
    return items


class ResponsesStream:
    """Pipeline events as Responses stream events (the pipeline's StreamFormat)."""

    def __init__(self, builder: ResponseBuilder) -> None:
        self._builder = builder
        self._sequence = 0
        self._output: list[OutputItem] = []  # items done so far
        self._open: str | None = None  # "reasoning" or "message": the item being streamed
        self._open_id = ""
        self._text = ""  # of the open item
        self._logprobs: list[TokenLogprobShape] = []  # of the open message's text
        self._status = "completed"
        self._answered = False  # a message or a call is out: no empty message at the end

    def _event(self, shape_type: type[Any], **fields: Any) -> bytes:
        shape = shape_type(sequence_number=self._sequence, **fields)
        self._sequence += 1
        return sse.event(shape, name=fields["type"])

    def _lifecycle(self, kind: str, response: Response) -> bytes:
        return self._event(ResponseLifecycleEvent, type=f"response.{kind}", response=response)

    # -- items

    def _item_added(self, item: OutputItem) -> bytes:
        return self._event(
            OutputItemEvent, type="response.output_item.added", output_index=len(self._output), item=item
        )

    def _item_done(self, item: OutputItem) -> bytes:
        out = self._event(OutputItemEvent, type="response.output_item.done", output_index=len(self._output), item=item)
        self._output.append(item)
        return out

    def _part(self, kind: str, part: OutputText | ReasoningText) -> bytes:
        return self._event(
            ContentPartEvent,
            type=f"response.content_part.{kind}",
            item_id=self._open_id,
            output_index=len(self._output),
            content_index=0,
            part=part,
        )

    def _open_item(self, kind: str) -> Iterator[bytes]:
        if self._open == kind:
            return
        yield from self._close_item()
        self._open, self._text, self._logprobs = kind, "", []
        if kind == "reasoning":
            self._open_id = _item_id("rs")
            yield self._item_added(_reasoning_item(self._open_id, "", "in_progress"))
            yield self._part("added", ReasoningText(type="reasoning_text", text=""))
        else:
            self._answered = True
            self._open_id = _item_id("msg")
            yield self._item_added(_message_item(self._open_id, None, "in_progress"))
            yield self._part("added", _output_text(""))

    def _text_delta(self, text: str, logprobs: list[TokenLogprob] | None = None) -> bytes:
        self._text += text
        where = {"item_id": self._open_id, "output_index": len(self._output), "content_index": 0}
        if self._open == "reasoning":
            return self._event(ReasoningTextDeltaEvent, type="response.reasoning_text.delta", delta=text, **where)
        shapes = self._builder.logprobs(logprobs)
        self._logprobs += shapes
        return self._event(
            OutputTextDeltaEvent, type="response.output_text.delta", delta=text, logprobs=shapes, **where
        )

    def _close_item(self, status: str = "completed") -> Iterator[bytes]:
        kind, text = self._open, self._text
        if kind is None:
            return
        where = {"item_id": self._open_id, "output_index": len(self._output), "content_index": 0}
        if kind == "reasoning":
            yield self._event(ReasoningTextDoneEvent, type="response.reasoning_text.done", text=text, **where)
            yield self._part("done", ReasoningText(type="reasoning_text", text=text))
            item: OutputItem = _reasoning_item(self._open_id, text, status)
        else:
            logprobs = self._logprobs
            yield self._event(
                OutputTextDoneEvent, type="response.output_text.done", text=text, logprobs=logprobs, **where
            )
            yield self._part("done", _output_text(text, logprobs))
            item = _message_item(self._open_id, text, status, logprobs)
        self._open = None
        yield self._item_done(item)

    def _call(self, call: ToolCall) -> Iterator[bytes]:
        self._answered = True
        item_id = _item_id("fc")
        where = {"item_id": item_id, "output_index": len(self._output)}
        yield self._item_added(_call_item(item_id, call, "", "in_progress"))
        # The whole arguments in one delta: a call is cut out of the text once complete.
        yield self._event(
            FunctionCallArgumentsDeltaEvent,
            type="response.function_call_arguments.delta",
            delta=call.arguments,
            **where,
        )
        yield self._event(
            FunctionCallArgumentsDoneEvent,
            type="response.function_call_arguments.done",
            name=call.name,
            arguments=call.arguments,
            **where,
        )
        yield self._item_done(_call_item(item_id, call, call.arguments, "completed"))

    # -- pipeline events

    def started(self, event: pipeline.Started) -> Iterable[bytes]:
        response = self._builder.response("in_progress", [])
        return [self._lifecycle("created", response), self._lifecycle("in_progress", response)]

    def delta(self, event: pipeline.Delta) -> Iterator[bytes]:
        piece = event.piece
        if piece.reasoning:
            yield from self._open_item("reasoning")
            yield self._text_delta(piece.reasoning)
        if piece.text:
            yield from self._open_item("message")
            yield self._text_delta(piece.text, piece.logprobs)
        if piece.tool_calls:
            yield from self._close_item()
            for call in piece.tool_calls:
                yield from self._call(call)
        elif piece.logprobs and not (piece.text or piece.reasoning) and self._open == "message":
            # The last tokens completed no text: their logprobs end the message's list.
            self._logprobs += self._builder.logprobs(piece.logprobs)

    def finished(self, event: pipeline.Finished) -> Iterator[bytes]:
        self._status = _status(event.reason)
        yield from self._close_item(self._status)
        if not self._answered:
            yield from self._open_item("message")  # an empty answer is still a message, as unstreamed
            yield from self._close_item(self._status)

    def completed(self, event: pipeline.Completed) -> Iterable[bytes]:
        usage = self._builder.usage(event.usage)
        return [self._lifecycle(self._status, self._builder.response(self._status, self._output, usage))]

    def failed(self, event: pipeline.Failed) -> Iterable[bytes]:
        error = event.error
        return [
            self._event(ErrorEvent, type="error", code=error.code, message=error.message, param=error.param),
            self._lifecycle("failed", self._builder.response("failed", self._output, error=error)),
        ]

    def waiting(self, event: pipeline.Waiting) -> Iterable[bytes]:
        return [sse.KEEPALIVE_COMMENT]


class ResponsesResource:
    openapi = {
        "post": Operation(
            "Create a model response (OpenAI Responses API)",
            request=ResponsesRequest,
            response=Response,
            stream=ResponseStreamEvent,
            errors=GENERATION_ERRORS,
        )
    }

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = self._ctx
        request = read_request(req, ResponsesRequest, ctx.settings.max_request_bytes)
        generation = pipeline.start(ctx, pipeline.plan(ctx, pipeline_request(ctx, request)))
        builder = ResponseBuilder(generation, request, ctx.tokenization)
        pipeline.respond(
            req,
            resp,
            generation,
            stream=bool(request.stream),
            wire=ResponsesStream(builder),
            body_of=builder.body,
        )
