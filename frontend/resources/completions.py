"""POST /v1/completions (the legacy text completion API) over the request pipeline."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import falcon

from frontend import pipeline
from frontend.context import AppContext
from frontend.logprobs import completion_logprobs
from frontend.openai_shapes import Completion, CompletionChoice, CompletionFinishReason, CompletionLogprobs, Usage
from frontend.openai_stream import OpenAIStream, head
from frontend.openapi import GENERATION_ERRORS, Operation
from frontend.protocol import CompletionRequest
from frontend.request_body import read_request
from frontend.tokenization import Tokenization


def _prompt_ids(item: str | list[int], tok: Tokenization) -> list[int]:
    return tok.encode_prompt(item) if isinstance(item, str) else list(item)


def _echo_text(item: str | list[int], tok: Tokenization) -> str:
    # A string prompt is echoed verbatim; token prompts as their text.
    return item if isinstance(item, str) else tok.decode(item)


def pipeline_request(ctx: AppContext, request: CompletionRequest) -> pipeline.PipelineRequest:
    model, tok = ctx.engine.model, ctx.tokenization
    request.check_supported()
    items = request.prompt_items()
    pipeline.check_choices(ctx, request.choices_per_prompt, len(items), "prompt")  # before encoding them all
    stops = request.stop_strings()
    sampling = request.sampling(model.vocab_size)
    constraint = request.response_constraint()
    return pipeline.PipelineRequest(
        prompts=[_prompt_ids(item, tok) for item in items],
        prompt_param="prompt",
        id_prefix="cmpl",
        stops=stops,
        sampling=sampling,
        constraint=constraint,
        max_tokens=request.max_tokens,
        n=request.choices_per_prompt,
        logprobs=request.logprobs,
        split_reasoning=False,
        trim_leading_space=False,
    )


def echoes(request: CompletionRequest, n: int, tok: Tokenization) -> list[str]:
    """Per choice index, the prompt text echoed before the completion ("" without echo)."""
    items = request.prompt_items()
    return [_echo_text(items[i // n], tok) if request.echo else "" for i in range(len(items) * n)]


def text_completion(
    generation: pipeline.Generation, outcome: pipeline.Outcome, echo: Sequence[str], tok: Tokenization
) -> Completion:
    # Echo and logprobs never come together, so offsets start at 0.
    choices = [
        CompletionChoice(
            index=c.index,
            text=echo[c.index] + c.text,
            logprobs=completion_logprobs(c.logprobs, tok.token_entry),
            finish_reason=c.finish_reason,  # type: ignore[arg-type]
        )
        for c in outcome.choices
    ]
    return Completion(**head(generation), object="text_completion", choices=choices, usage=Usage.of(*outcome.usage))


class CompletionStream(OpenAIStream):
    """Pipeline events as text_completion chunks (an echoed prompt first)."""

    chunk_type = Completion
    object_name = "text_completion"

    def __init__(
        self, generation: pipeline.Generation, include_usage: bool, echo: Sequence[str], tok: Tokenization
    ) -> None:
        super().__init__(generation, include_usage)
        self._echo = echo
        self._tok = tok

    def _choice(
        self,
        index: int,
        text: str,
        finish_reason: CompletionFinishReason | None = None,
        logprobs: CompletionLogprobs | None = None,
    ) -> bytes:
        return self.chunk([CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)])

    def started(self, event: pipeline.Started) -> Iterable[bytes]:
        echo = self._echo[event.index]
        return [self._choice(event.index, echo)] if echo else []

    def delta(self, event: pipeline.Delta) -> Iterable[bytes]:
        logprobs = completion_logprobs(event.piece.logprobs, self._tok.token_entry)
        return [self._choice(event.index, event.piece.text, None, logprobs)]

    def finished(self, event: pipeline.Finished) -> Iterable[bytes]:
        return [self._choice(event.index, "", event.reason)]  # type: ignore[arg-type]


class CompletionsResource:
    openapi = {
        "post": Operation(
            "Text completion",
            request=CompletionRequest,
            response=Completion,
            stream=Completion,
            errors=GENERATION_ERRORS,
        )
    }

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx, tok = self._ctx, self._ctx.tokenization
        request = read_request(req, CompletionRequest, ctx.settings.max_request_bytes)
        checked = pipeline.plan(ctx, pipeline_request(ctx, request))
        echo = echoes(request, checked.request.n, tok)  # decodes token prompts: only checked ones
        generation = pipeline.start(ctx, checked)
        pipeline.respond(
            req,
            resp,
            generation,
            stream=bool(request.stream),
            wire=CompletionStream(generation, request.include_usage, echo, tok),
            body_of=lambda outcome: text_completion(generation, outcome, echo, tok),
        )
