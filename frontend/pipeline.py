"""The request pipeline every generation API shares: prompt -> engine requests -> events.

An API adapter (a resource) validates its own request model, builds the
prompt token ids and maps its fields to a ``PipelineRequest``. ``plan``
checks the prompts against the model (vocabulary, context, n); ``start``
submits one engine request per choice and returns a ``Generation``. The adapter answers
with ``respond``: its ``StreamFormat`` turns the generation's events into
SSE bytes (named events or ``data:`` chunks, a final ``[DONE]`` or not),
its ``body_of`` turns the collected ``Outcome`` into one JSON body.

Events come choice after choice, each as ``Started``, ``Delta``s and
``Finished``; then ``Completed`` with the usage, or ``Failed`` instead as
soon as anything goes wrong after the headers are sent. ``Waiting`` comes
every keep-alive interval while a choice waits for its first token.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import falcon

from frontend import sse
from frontend.context import AppContext
from frontend.disconnect import client_gone_check
from frontend.engine_client import EngineClient, EngineUnavailable, RequestStream
from frontend.errors import APIError, engine_unavailable, internal_error, invalid_request
from frontend.generation import ChoiceRun, FinishedChoice, Piece, choice_sampling, usage_counts
from frontend.metrics import observe_stream
from frontend.middleware import bind_request_id
from frontend.reasoning import ThinkingMarkers
from frontend.shapes import Shape
from frontend.tools import ToolPlan
from ipc.messages import Constraint, Generate, ModelInfo, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineRequest:
    """What an API asks of the engine, in the pipeline's terms."""

    prompts: Sequence[Sequence[int]]  # token ids, one list per prompt
    prompt_param: str  # the request field errors about the prompt name ("messages", "prompt")
    id_prefix: str  # of the response id ("chatcmpl", "cmpl")
    sampling: SamplingParams
    max_tokens: int | None = None  # None: the rest of the context, capped by the settings
    n: int = 1  # choices per prompt; choice index = prompt * n + j
    stops: tuple[str, ...] = ()
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: no logprobs; else how many top logprobs per token
    tools: ToolPlan | None = None  # calls are cut out of the text when the plan parses them
    # A thinking model's reasoning comes apart from the answer (Piece.reasoning);
    # a completion's text is its tokens' text, markers and all.
    split_reasoning: bool = True
    # Drop the first token's leading space as mlx-lm does (chat); a completion's
    # text must be exactly its tokens' text, so it keeps it.
    trim_leading_space: bool = True


class TokenCounts(NamedTuple):
    prompt: int
    completion: int
    cached: int


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Started:
    index: int


@dataclass(frozen=True, slots=True)
class Delta:
    """Text, logprobs and completed tool calls of one choice (any may be empty)."""

    index: int
    piece: Piece


@dataclass(frozen=True, slots=True)
class Finished:
    index: int
    reason: str  # "stop", "length" or "tool_calls"


@dataclass(frozen=True, slots=True)
class Completed:
    usage: TokenCounts


@dataclass(frozen=True, slots=True)
class Failed:
    error: APIError


@dataclass(frozen=True, slots=True)
class Waiting:
    """No token yet after the keep-alive interval: the stream says it is alive."""

    index: int


Event = Started | Delta | Finished | Completed | Failed | Waiting


class StreamFormat(Protocol):
    """An API's wire format for streamed events: each returns SSE bytes (maybe none)."""

    def started(self, event: Started) -> Iterable[bytes]: ...

    def delta(self, event: Delta) -> Iterable[bytes]: ...

    def finished(self, event: Finished) -> Iterable[bytes]: ...

    def completed(self, event: Completed) -> Iterable[bytes]: ...

    def failed(self, event: Failed) -> Iterable[bytes]: ...

    def waiting(self, event: Waiting) -> Iterable[bytes]: ...


def encode(events: Iterator[Event], wire: StreamFormat) -> Iterator[bytes]:
    """SSE bytes of ``events``; a wire format failing on an event ends the stream with its error event."""
    handlers: dict[type, Callable[[Event], Iterable[bytes]]] = {
        Started: wire.started,  # type: ignore[dict-item]
        Delta: wire.delta,  # type: ignore[dict-item]
        Finished: wire.finished,  # type: ignore[dict-item]
        Completed: wire.completed,  # type: ignore[dict-item]
        Failed: wire.failed,  # type: ignore[dict-item]
        Waiting: wire.waiting,  # type: ignore[dict-item]
    }
    try:
        for event in events:
            yield from handlers[type(event)](event)
    except Exception as exc:
        yield from wire.failed(Failed(_as_api_error(exc)))
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # a generator's finally closes the engine streams


@dataclass(frozen=True)
class Outcome:
    """A generation run to its end (non-streaming)."""

    choices: list[FinishedChoice]
    usage: TokenCounts


# ---------------------------------------------------------------- planning


def new_response_id(prefix: str) -> str:
    return bind_request_id(f"{prefix}-{uuid.uuid4().hex}")


def resolve_max_tokens(
    requested: int | None, prompt_tokens: int, model: ModelInfo, default_max_tokens: int, prompt_param: str
) -> int:
    """max_tokens for one prompt; a prompt that cannot fit is the client's error."""
    room = model.context_length - prompt_tokens
    if requested is None:
        if room < 1:
            raise _context_exceeded(model.context_length, prompt_tokens, 1, prompt_param)
        return min(room, default_max_tokens)
    if requested > room:
        raise _context_exceeded(model.context_length, prompt_tokens, requested, prompt_param)
    return requested


def _context_exceeded(context_length: int, prompt_tokens: int, max_tokens: int, param: str) -> APIError:
    return invalid_request(
        f"This model's maximum context length is {context_length} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} in the completion). "
        f"Please reduce the length of the {param} or max_tokens.",
        param=param,
        code="context_length_exceeded",
    )


def check_prompt_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    if not token_ids:
        raise invalid_request("the prompt is empty (no tokens)", param=param)
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid_request(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param=param)


def check_choices(ctx: AppContext, n: int, prompts: int, prompt_param: str) -> None:
    """Each choice is one engine request (one batch slot): the settings cap them."""
    settings = ctx.settings
    if n > settings.max_n:
        raise invalid_request(f"n must be at most {settings.max_n}", param="n")
    if prompts * n > settings.max_choices:
        raise invalid_request(
            f"{prompts} prompts x n={n} is more than {settings.max_choices} choices per request", param=prompt_param
        )


def _submit_all(engine: EngineClient, requests: Sequence[Generate]) -> list[RequestStream]:
    """Submit every request or none: a failure closes those already submitted."""
    streams: list[RequestStream] = []
    try:
        for request in requests:
            streams.append(observe_stream(engine.submit(request), request))
    except BaseException:
        sse.close_all(streams)
        raise
    finally:
        engine.settle()  # after the Generates: the engine sees them first
    return streams


@dataclass(frozen=True)
class Plan:
    """A request whose prompts passed every check, with each prompt's max_tokens."""

    request: PipelineRequest
    max_tokens: list[int]


def plan(ctx: AppContext, request: PipelineRequest) -> Plan:
    """Check the prompts against the model and the settings (400 naming the field)."""
    model, settings = ctx.engine.model, ctx.settings
    check_choices(ctx, request.n, len(request.prompts), request.prompt_param)
    max_tokens = []
    for ids in request.prompts:
        check_prompt_ids(ids, model.vocab_size, request.prompt_param)
        max_tokens.append(
            resolve_max_tokens(request.max_tokens, len(ids), model, settings.default_max_tokens, request.prompt_param)
        )
    return Plan(request, max_tokens)


def start(ctx: AppContext, checked: Plan) -> Generation:
    """Submit one engine request per choice (EngineUnavailable -> 503)."""
    request, max_tokens, model = checked.request, checked.max_tokens, ctx.engine.model
    n = request.n
    response_id = new_response_id(request.id_prefix)
    generates = [
        Generate(
            request_id=f"{response_id}-{p * n + j}",
            prompt_token_ids=list(ids),
            max_tokens=max_tokens[p],
            sampling=choice_sampling(request.sampling, j),
            constraint=request.constraint,
            logprobs=request.logprobs,
        )
        for p, ids in enumerate(request.prompts)
        for j in range(n)
    ]
    streams = _submit_all(ctx.engine, generates)
    thinking = ctx.tokenization.thinking if request.split_reasoning else None
    kept = (*(request.tools.marker_ids if request.tools is not None else ()), *_marker_ids(thinking))
    tool_format = request.tools.format if request.tools is not None else None
    exits = (tool_format.start,) if tool_format is not None else ()  # a call's start ends the reasoning
    exit_ids = [i for i in map(ctx.tokenization.marker_token_id, exits) if i is not None]
    try:
        runs = [
            ChoiceRun(
                i,
                stream,
                ctx.tokenization.detokenizer(trim_leading_space=request.trim_leading_space, keep_token_ids=kept),
                request.stops,
                prompt_group=i // n,
                logprobs=request.logprobs is not None,
                tools=request.tools.splitter() if request.tools is not None else None,
                reasoning=thinking.splitter(request.prompts[i // n], exits, exit_ids) if thinking is not None else None,
            )
            for i, stream in enumerate(streams)
        ]
    except BaseException:
        sse.close_all(streams)
        raise
    log.debug("%s: %d prompts, n %d, max_tokens %s", response_id, len(request.prompts), n, max_tokens)
    prompt_lengths = [len(ids) for ids in request.prompts]
    return Generation(response_id, int(time.time()), model.model_id, runs, prompt_lengths, ctx.settings.keep_alive_s)


def _marker_ids(thinking: ThinkingMarkers | None) -> tuple[int, ...]:
    """The reasoning markers' tokens: kept in the text (even when special) for the splitter to see."""
    return () if thinking is None else (*thinking.start_ids, *thinking.end_ids)


# ---------------------------------------------------------------- running


def _as_api_error(exc: Exception) -> APIError:
    """A failure after the headers went out, as the error the client is told."""
    if isinstance(exc, APIError):
        # A client error (a request too large for the engine) is not the server's failure.
        log.log(logging.ERROR if exc.status >= 500 else logging.WARNING, "stream failed: %s", exc.message)
        return exc
    if isinstance(exc, EngineUnavailable):
        log.warning("stream failed: engine unavailable: %s", exc)
        return engine_unavailable(exc)
    log.exception("stream failed")
    return internal_error()


class Generation:
    """The engine requests of one API request, read as events or collected."""

    def __init__(
        self,
        response_id: str,
        created: int,
        model_id: str,
        runs: list[ChoiceRun],
        prompt_lengths: list[int],
        keep_alive_s: float = sse.KEEPALIVE_INTERVAL_S,
    ) -> None:
        self.response_id = response_id
        self._keep_alive_s = keep_alive_s
        self.created = created
        self.model_id = model_id
        self.runs = runs
        self._prompt_lengths = prompt_lengths

    @property
    def streams(self) -> list[RequestStream]:
        return [run.stream for run in self.runs]

    def usage(self) -> TokenCounts:
        return TokenCounts(*usage_counts(self._prompt_lengths, self.runs))

    def reasoning_tokens(self) -> int | None:
        """Output tokens that were reasoning (part of ``usage().completion``); None when
        reasoning is not split (completions, a model that does not think)."""
        counts = [run.reasoning_tokens for run in self.runs]
        return None if any(c is None for c in counts) else sum(c or 0 for c in counts)

    def events(self) -> Iterator[Event]:
        """Every choice in turn, then Completed; Failed ends the events early.

        Choices are read one after another: the engine runs them concurrently
        and the client buffers each request's deltas, so later choices arrive
        in a burst. Until a choice's first delta is there, Waiting comes every
        keep-alive interval (the wait blocks: no polling).
        """
        try:
            for run in self.runs:
                yield Started(run.index)
                while not run.stream.wait(self._keep_alive_s):
                    yield Waiting(run.index)
                for piece in run.parts():
                    yield Delta(run.index, piece)
                assert run.finish_reason is not None
                yield Finished(run.index, run.finish_reason)
            yield Completed(self.usage())
        except Exception as exc:
            yield Failed(_as_api_error(exc))
        finally:
            sse.close_all(self.streams)

    def collect(self, client_gone: Callable[[], bool] | None = None) -> Outcome:
        """Run every choice to its end; a client that hangs up aborts its requests."""
        try:
            if client_gone is not None:
                for stream in self.streams:
                    stream.watch(client_gone)
            return Outcome([run.finish() for run in self.runs], self.usage())
        finally:
            sse.close_all(self.streams)


def respond(
    req: falcon.Request,
    resp: falcon.Response,
    generation: Generation,
    *,
    stream: bool,
    wire: StreamFormat,
    body_of: Callable[[Outcome], Shape],
) -> None:
    """Answer with SSE (the body then owns the streams) or with one JSON body.

    Whatever happens here, every stream ends closed: by the SSE body's close,
    or by ``collect`` (DESIGN rule 3).
    """
    if stream:
        try:
            resp.content_type = sse.CONTENT_TYPE
            resp.set_headers(sse.HEADERS)
            resp.stream = sse.SSEBody(encode(generation.events(), wire), generation.streams)
        except BaseException:
            sse.close_all(generation.streams)
            raise
        return
    outcome = generation.collect(client_gone_check(req))
    resp.content_type = falcon.MEDIA_JSON
    resp.data = body_of(outcome).dump()
