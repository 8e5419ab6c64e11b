"""POST /v1/chat/completions: OpenAI chat over the request pipeline."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import falcon

from frontend import pipeline
from frontend.context import AppContext
from frontend.errors import invalid_request, unsupported
from frontend.generation import FinishedChoice
from frontend.logprobs import chat_logprobs
from frontend.openai_shapes import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatFinishReason,
    ChoiceLogprobs,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from frontend.openai_stream import OpenAIStream, head
from frontend.openapi import GENERATION_ERRORS, Operation
from frontend.protocol import TEMPLATE_VARIABLE_FIELDS, ChatCompletionRequest
from frontend.reasoning import effort_switch
from frontend.request_body import read_request
from frontend.tokenization import ChatTemplateError, Tokenization, reserved_template_kwargs
from frontend.tools import ToolCall as ParsedCall


def _template_kwargs(request: ChatCompletionRequest, tok: Tokenization) -> dict:
    template_kwargs = request.chat_template_kwargs or {}
    reserved = sorted(set(template_kwargs) & reserved_template_kwargs())
    if reserved:
        raise invalid_request(
            f"chat_template_kwargs may only set template variables, not {', '.join(reserved)}",
            param="chat_template_kwargs",
        )
    for name in TEMPLATE_VARIABLE_FIELDS:
        value = getattr(request, name)
        if value is None or (name == "reasoning_effort" and not tok.template_mentions(name)):
            continue  # reasoning_effort: the template's own variable (gpt-oss), else _thinking
        if not tok.template_mentions(name):
            raise unsupported(name, f"{name} is not supported: this model's chat template does not use it")
        template_kwargs = {name: value, **template_kwargs}
    return template_kwargs


def pipeline_request(ctx: AppContext, request: ChatCompletionRequest) -> pipeline.PipelineRequest:
    model, tok = ctx.engine.model, ctx.tokenization
    request.check_supported()
    stops = request.stop_strings()
    sampling = request.sampling(model.vocab_size)
    tools = request.tool_plan(model, tok.marker_token_id)
    constraint = request.constraint(tools)
    template_kwargs = _template_kwargs(request, tok)
    thinking = effort_switch(request.reasoning_effort, tok, "reasoning_effort")
    try:
        prompt = tok.render_chat(
            request.template_messages(), tools=tools.template_tools, template_kwargs=template_kwargs, thinking=thinking
        )
    except ChatTemplateError as exc:
        raise invalid_request(str(exc), param="messages") from None
    return pipeline.PipelineRequest(
        prompts=[prompt],
        prompt_param="messages",
        id_prefix="chatcmpl",
        sampling=sampling,
        max_tokens=request.requested_max_tokens,
        n=request.choices_per_prompt,
        stops=stops,
        constraint=constraint,
        logprobs=request.engine_logprobs,
        tools=tools,
    )


def _tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall.model_validate(call.as_dict())


def _reasoning_fields(reasoning: str) -> dict[str, str]:
    """vLLM's ``reasoning_content`` and the newer ``reasoning`` (mlx-lm, OpenRouter): clients read either."""
    return {"reasoning_content": reasoning, "reasoning": reasoning} if reasoning else {}


def _message(choice: FinishedChoice) -> AssistantMessage:
    reasoning = _reasoning_fields(choice.reasoning)
    if not choice.tool_calls:
        return AssistantMessage(role="assistant", content=choice.text, refusal=None, **reasoning)
    return AssistantMessage(
        role="assistant",
        content=choice.text or None,  # OpenAI: null when the answer is only calls
        refusal=None,
        tool_calls=[_tool_call(call) for call in choice.tool_calls],
        **reasoning,
    )


def _choice(choice: FinishedChoice, tok: Tokenization) -> ChatChoice:
    logprobs = chat_logprobs(choice.logprobs, tok.token_entry)
    reason: Any = choice.finish_reason  # the shape checks it is one of OpenAI's
    return ChatChoice(index=choice.index, message=_message(choice), logprobs=logprobs, finish_reason=reason)


def chat_completion(generation: pipeline.Generation, outcome: pipeline.Outcome, tok: Tokenization) -> ChatCompletion:
    choices = [_choice(c, tok) for c in outcome.choices]
    usage = Usage.of(*outcome.usage, reasoning_tokens=generation.reasoning_tokens())
    return ChatCompletion(**head(generation), object="chat.completion", choices=choices, usage=usage)


class ChatStream(OpenAIStream):
    """Pipeline events as chat.completion.chunk events."""

    chunk_type = ChatCompletionChunk
    object_name = "chat.completion.chunk"

    def __init__(self, generation: pipeline.Generation, include_usage: bool, tok: Tokenization) -> None:
        super().__init__(generation, include_usage)
        self._tok = tok
        self._calls_sent: dict[int, int] = {}  # choice index -> tool calls streamed so far

    def _choice(
        self,
        index: int,
        delta: ChatDelta,
        finish_reason: ChatFinishReason | None = None,
        logprobs: ChoiceLogprobs | None = None,
    ) -> bytes:
        return self.chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])

    def started(self, event: pipeline.Started) -> Iterable[bytes]:
        return [self._choice(event.index, ChatDelta(role="assistant", content=""))]

    def delta(self, event: pipeline.Delta) -> Iterable[bytes]:
        piece, index = event.piece, event.index
        only_other = piece.tool_calls or piece.reasoning  # no content key when the piece is calls or reasoning
        fields: dict[str, Any] = {"content": piece.text} if piece.text or not only_other else {}
        fields.update(_reasoning_fields(piece.reasoning))
        if piece.tool_calls:
            # Each call whole in one delta (name and all arguments): clients
            # that concatenate argument fragments get the same result.
            first = self._calls_sent.get(index, 0)
            fields["tool_calls"] = [
                ToolCallDelta.model_validate({"index": first + k, **call.as_dict()})
                for k, call in enumerate(piece.tool_calls)
            ]
            self._calls_sent[index] = first + len(piece.tool_calls)
        logprobs = chat_logprobs(piece.logprobs, self._tok.token_entry)
        return [self._choice(index, ChatDelta(**fields), None, logprobs)]

    def finished(self, event: pipeline.Finished) -> Iterable[bytes]:
        return [self._choice(event.index, ChatDelta(), event.reason)]  # type: ignore[arg-type]


class ChatCompletionsResource:
    openapi = {
        "post": Operation(
            "Chat completion",
            request=ChatCompletionRequest,
            response=ChatCompletion,
            stream=ChatCompletionChunk,
            errors=GENERATION_ERRORS,
        )
    }

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx, tok = self._ctx, self._ctx.tokenization
        request = read_request(req, ChatCompletionRequest, ctx.settings.max_request_bytes)
        generation = pipeline.start(ctx, pipeline.plan(ctx, pipeline_request(ctx, request)))
        pipeline.respond(
            req,
            resp,
            generation,
            stream=bool(request.stream),
            wire=ChatStream(generation, request.include_usage, tok),
            body_of=lambda outcome: chat_completion(generation, outcome, tok),
        )
