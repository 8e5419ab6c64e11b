"""Driving engine requests into text: the logic chat and completions share.

One ``ChoiceRun`` per engine request: it detokenizes the TokenDeltas
incrementally, applies stop strings (the stop text never reaches the client,
also when it is split across tokens), counts tokens and maps the engine's
finish reason. ``stream_events`` turns runs into SSE bytes; ``collect`` into
finished choices.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Optional, Protocol, Sequence, TypeVar

import falcon
import msgspec
from pydantic import BaseModel, ValidationError

from frontend import sse
from frontend.engine_client import EngineClient, EngineOverloaded, EngineUnavailable, RequestStream
from frontend.errors import (
    SERVER_ERROR,
    APIError,
    engine_unavailable_body,
    error_body,
    generation_failed,
    invalid_request,
)
from frontend.metrics import observe_stream
from frontend.middleware import bind_request_id
from frontend.tokenization import IncrementalDetokenizer
from frontend.tools import ToolCall, ToolCallSplitter
from ipc.messages import Generate, ModelInfo, SamplingParams, TokenDelta

log = logging.getLogger(__name__)

_Model = TypeVar("_Model", bound=BaseModel)
_json = msgspec.json.Encoder()


# ---------------------------------------------------------------- reading requests


def read_request(req: falcon.Request, model: type[_Model], max_bytes: int) -> _Model:
    """Parse the JSON body into ``model``; any problem is a 4xx naming the field."""
    if req.content_length is not None and req.content_length > max_bytes:
        raise APIError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise APIError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    if not raw.strip():
        raise invalid_request("the request body is empty; expected a JSON object")
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, data) from None


def _validation_error(exc: ValidationError, data: dict[str, Any]) -> APIError:
    first = exc.errors(include_url=False)[0]
    param = _param(first["loc"], data)
    if first["type"] == "missing":
        return invalid_request(f"missing required parameter: {param!r}", param=param)
    message = first["msg"].removeprefix("Value error, ")  # our own validators' ValueErrors
    return invalid_request(f"invalid value for {param!r}: {message}", param=param)


def _param(loc: Sequence[Any], data: Any) -> Optional[str]:
    """``messages[0].content`` from a pydantic location, following only the
    steps that exist in the input (pydantic adds union member names)."""
    out = ""
    node = data
    for step in loc:
        if isinstance(node, dict) and isinstance(step, str):
            out += f".{step}" if out else step
            node = node.get(step)
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            out += f"[{step}]"
            node = node[step]
        else:
            break
    return out or None


# ---------------------------------------------------------------- planning


def new_response_id(prefix: str) -> str:
    return bind_request_id(f"{prefix}-{uuid.uuid4().hex}")


def now() -> int:
    return int(time.time())


def resolve_max_tokens(
    requested: Optional[int], prompt_tokens: int, model: ModelInfo, default_max_tokens: int, prompt_param: str
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


def choice_sampling(sampling: SamplingParams, choice: int) -> SamplingParams:
    """Choices of one prompt with a seed get distinct, reproducible seeds
    (the same seed for all n would give n identical answers)."""
    if sampling.seed is None or choice == 0:
        return sampling
    return msgspec.structs.replace(sampling, seed=(sampling.seed + choice) % 2**64)


def submit_all(engine: EngineClient, requests: Sequence[Generate]) -> list[RequestStream]:
    """Submit every request or none: a failure closes those already submitted."""
    streams: list[RequestStream] = []
    try:
        for request in requests:
            streams.append(observe_stream(engine.submit(request), request))
    except BaseException:
        sse.close_all(streams)
        raise
    return streams


def start_runs(
    engine: EngineClient,
    requests: Sequence[Generate],
    make_run: Callable[[int, RequestStream], "ChoiceRun"],
) -> list["ChoiceRun"]:
    """Submit every request (EngineUnavailable -> 503) and wrap each stream."""
    streams = submit_all(engine, requests)
    try:
        return [make_run(index, stream) for index, stream in enumerate(streams)]
    except BaseException:
        sse.close_all(streams)
        raise


# ---------------------------------------------------------------- stop strings


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting them.

    Text that could be the start of a stop string is held back until the next
    piece shows whether it is one.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


# ---------------------------------------------------------------- one choice


def _unexpected_abort(delta: TokenDelta) -> Exception:
    # We only abort by closing the stream, after which we stop reading; an
    # abort seen here came from the engine (shutting down or draining).
    return EngineUnavailable("the engine aborted the request")


def _failed(delta: TokenDelta) -> Exception:
    return generation_failed(delta.error)


def _overloaded(delta: TokenDelta) -> Exception:
    return EngineOverloaded(delta.error or "the engine's queue is full")


# Engine finish reasons that end a choice in error, and how.
_FAILURES = {"abort": _unexpected_abort, "error": _failed, "overloaded": _overloaded}


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's logprob (engine floats, ids still to be named)."""

    token_id: int
    logprob: float
    top: Sequence[tuple[int, float]]  # (id, logprob), most likely first
    offset: int  # where the token's text starts in the choice's text


class Piece(NamedTuple):
    text: str
    # Tokens whose text this piece completes; None when logprobs were not asked for.
    logprobs: Optional[list[TokenLogprob]] = None
    # Tool calls completed in this piece (chat with tools).
    tool_calls: Optional[list[ToolCall]] = None


@dataclass(frozen=True)
class FinishedChoice:
    index: int
    text: str
    finish_reason: str
    logprobs: Optional[list[TokenLogprob]] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChoiceRun:
    """One engine request turned into text pieces for one choice.

    With ``logprobs``, tokens are detokenized one at a time so each knows
    where its text starts; a token's logprob is released with the piece that
    completes its text, and tokens after a stop string are dropped with it.
    """

    def __init__(
        self,
        index: int,
        stream: RequestStream,
        detokenizer: IncrementalDetokenizer,
        stops: Sequence[str],
        prompt_group: int = 0,
        *,
        logprobs: bool = False,
        tools: Optional[ToolCallSplitter] = None,
    ) -> None:
        self.index = index
        self.prompt_group = prompt_group  # completions: which prompt this choice answers
        self.stream = stream
        self._detokenizer = detokenizer
        self._stops = StopMatcher(stops)
        self._want_logprobs = logprobs
        self._tools = tools  # cuts tool calls out of the text
        self._held: list[TokenLogprob] = []  # logprobs of tokens whose text is not out yet
        self._ends: list[int] = []  # end offset of each held token's text
        self._produced = 0  # characters detokenized so far
        self._emitted = 0  # characters released to the client so far
        self.finish_reason: Optional[str] = None
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._seen_first = False

    def _detokenize(self, delta: TokenDelta) -> str:
        if not self._want_logprobs:
            return self._detokenizer.add(delta.token_ids)
        if delta.token_ids and delta.logprobs is None:
            raise EngineUnavailable(f"request {self.stream.request_id}: the engine sent no logprobs")
        tops = delta.top_logprobs or [()] * len(delta.token_ids)
        texts = []
        for token_id, logprob, top in zip(delta.token_ids, delta.logprobs or (), tops):
            text = self._detokenizer.add([token_id])
            self._held.append(TokenLogprob(token_id, logprob, top, self._produced))
            self._produced += len(text)
            self._ends.append(self._produced)
            texts.append(text)
        return "".join(texts)

    def _release(self, *, upto_start: Optional[int] = None, all_: bool = False) -> Optional[list[TokenLogprob]]:
        """Logprobs of held tokens whose text is out (or, after a stop string,
        that contributed text before it); None when logprobs are off."""
        if not self._want_logprobs:
            return None
        if all_:
            out, self._held, self._ends = self._held, [], []
            return out
        if upto_start is not None:
            out = [t for t in self._held if t.offset < upto_start]
            self._held, self._ends = [], []
            return out
        n = 0
        while n < len(self._held) and self._ends[n] <= self._emitted:
            n += 1
        out, self._held, self._ends = self._held[:n], self._held[n:], self._ends[n:]
        return out

    def parts(self) -> Iterator[Piece]:
        """Yield output pieces as they become final; set finish_reason at the end."""
        for delta in self.stream:
            if not self._seen_first:
                self._seen_first = True
                self.cached_tokens = delta.cached_prompt_tokens
            failure = _FAILURES.get(delta.finish_reason or "")
            if failure is not None:
                raise failure(delta)
            self.completion_tokens += len(delta.token_ids)
            text = self._detokenize(delta)
            if delta.finish_reason is not None:
                tail = self._detokenizer.finalize()
                text += tail
                self._produced += len(tail)
            out, matched = self._stops.feed(text)
            self._emitted += len(out)
            if matched:
                yield from self._pieces(out, self._release(upto_start=self._emitted), final=True)
                self._finish("stop")
                self.stream.close()  # aborts the rest of the generation in the engine
                return
            if delta.finish_reason is not None:
                out += self._stops.flush()
                yield from self._pieces(out, self._release(all_=True), final=True)
                self._finish(delta.finish_reason)
                return
            if out:
                yield from self._pieces(out, self._release(), final=False)
                if self._tools is not None and self._tools.done:
                    self._finish("stop")  # the one call allowed is complete
                    self.stream.close()
                    return
        raise EngineUnavailable(f"request {self.stream.request_id} ended without a final message")

    def _pieces(self, text: str, released: Optional[list[TokenLogprob]], *, final: bool) -> Iterator[Piece]:
        calls: list[ToolCall] = []
        if self._tools is not None:
            text, calls = self._tools.feed(text)
            if final:
                text += self._tools.flush()
        if text or released or calls:
            yield Piece(text, released, calls or None)

    def _finish(self, reason: str) -> None:
        # OpenAI: a response that ends after tool calls finishes with "tool_calls".
        made_calls = self._tools is not None and self._tools.calls > 0
        self.finish_reason = "tool_calls" if reason == "stop" and made_calls else reason

    def pieces(self) -> Iterator[str]:
        """The text of ``parts()``."""
        return (part.text for part in self.parts())

    def finish(self, prefix: str = "") -> FinishedChoice:
        """Run to the end (non-streaming)."""
        texts: list[str] = [prefix]
        logprobs: Optional[list[TokenLogprob]] = [] if self._want_logprobs else None
        calls: list[ToolCall] = []
        for part in self.parts():
            texts.append(part.text)
            if logprobs is not None and part.logprobs:
                logprobs.extend(part.logprobs)
            calls += part.tool_calls or []
        assert self.finish_reason is not None
        return FinishedChoice(self.index, "".join(texts), self.finish_reason, logprobs, calls or None)

    def text(self) -> str:
        return "".join(self.pieces())


def collect(runs: Sequence[ChoiceRun], prefixes: Sequence[str] = ()) -> list[FinishedChoice]:
    """Run every choice to its end (non-streaming); ``prefixes``: echoed prompts."""
    return [run.finish(prefixes[run.index] if run.index < len(prefixes) else "") for run in runs]


def usage_counts(prompt_lengths: Sequence[int], runs: Sequence[ChoiceRun]) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens. A prompt counts once however many
    choices it has; its cached count is its first choice's."""
    cached: dict[int, int] = {}
    for run in runs:
        cached.setdefault(run.prompt_group, run.cached_tokens)
    return sum(prompt_lengths), sum(r.completion_tokens for r in runs), sum(cached.values())


# ---------------------------------------------------------------- streaming


class ChunkShaper(Protocol):
    def start(self, index: int) -> list[dict[str, Any]]: ...

    def piece(self, index: int, piece: Piece) -> dict[str, Any]: ...

    def finish(self, index: int, finish_reason: str) -> dict[str, Any]: ...

    def usage(self, usage_: dict[str, Any]) -> dict[str, Any]: ...


def stream_events(
    runs: Sequence[ChoiceRun],
    shaper: ChunkShaper,
    usage_of: Optional[Callable[[], dict[str, Any]]] = None,
) -> Iterator[bytes]:
    """SSE bytes for every choice in turn, then usage (if ``usage_of``), then [DONE].

    Choices are read one after another: the engine runs them concurrently and
    the client buffers each request's deltas, so later choices arrive in a burst.
    Failures after the headers are sent become one error event (no [DONE]).
    """
    try:
        for run in runs:
            for chunk in shaper.start(run.index):
                yield sse.event(chunk)
            for piece in run.parts():
                yield sse.event(shaper.piece(run.index, piece))
            assert run.finish_reason is not None
            yield sse.event(shaper.finish(run.index, run.finish_reason))
        if usage_of is not None:
            yield sse.event(shaper.usage(usage_of()))
        yield sse.DONE
    except EngineUnavailable as exc:
        log.warning("stream failed: engine unavailable: %s", exc)
        yield sse.event(engine_unavailable_body(exc))
    except APIError as exc:
        log.error("stream failed: %s", exc.message)
        yield sse.event(exc.body())
    except Exception:
        log.exception("stream failed")
        yield sse.event(error_body("internal server error", SERVER_ERROR, None, "internal_error"))
    finally:
        sse.close_all(run.stream for run in runs)


def respond(
    resp: falcon.Response,
    runs: Sequence[ChoiceRun],
    *,
    stream: bool,
    shaper: ChunkShaper,
    usage_of: Callable[[], dict[str, Any]],
    include_usage: bool,
    body_of: Callable[[list[FinishedChoice]], dict[str, Any]],
    prefixes: Sequence[str] = (),
    client_gone: Optional[Callable[[], bool]] = None,
) -> None:
    """Answer with SSE (the body then owns the streams) or with one JSON body.

    Whatever happens here, every stream ends closed: by the SSE body's close,
    or in the ``finally`` below (DESIGN rule 3).
    """
    streams = [run.stream for run in runs]
    handed_off = False
    try:
        if stream:
            resp.content_type = sse.CONTENT_TYPE
            resp.set_headers(sse.HEADERS)
            resp.stream = sse.SSEBody(stream_events(runs, shaper, usage_of if include_usage else None), streams)
            handed_off = True
            return
        if client_gone is not None:
            for s in streams:
                s.watch(client_gone)  # a client that hangs up aborts its request
        choices = collect(runs, prefixes)
    finally:
        if not handed_off:
            sse.close_all(streams)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _json.encode(body_of(choices))
