"""One engine request turned into the text of one choice.

One ``ChoiceRun`` per engine request: it detokenizes the TokenDeltas
incrementally, applies stop strings (the stop text never reaches the client,
also when it is split across tokens), counts tokens and maps the engine's
finish reason. A thinking model's reasoning is parted from the answer first;
stop strings and tool calls apply to the answer only, while max_tokens and
usage count every token. ``frontend.pipeline`` drives the runs of a request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import msgspec

from frontend.engine_client import EngineOverloaded, EngineUnavailable, RequestStream
from frontend.errors import generation_failed, request_too_large
from frontend.reasoning import ReasoningSplitter
from frontend.text_scan import partial_suffix
from frontend.tokenization import IncrementalDetokenizer
from frontend.tools import Splitter, ToolCall
from ipc.messages import SamplingParams, TokenDelta

# ---------------------------------------------------------------- sampling


def choice_sampling(sampling: SamplingParams, choice: int) -> SamplingParams:
    """Choices of one prompt with a seed get distinct, reproducible seeds
    (the same seed for all n would give n identical answers)."""
    if sampling.seed is None or choice == 0:
        return sampling
    return msgspec.structs.replace(sampling, seed=(sampling.seed + choice) % 2**64)


# ---------------------------------------------------------------- stop strings


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting them.

    Text that could be the start of a stop string is held back until the next
    piece shows whether it is one.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""
        self.matched: str | None = None  # the stop string found (Anthropic reports it)

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [(i, s) for s in self._stops if (i := buffer.find(s)) >= 0]
        if hits:
            self._held = ""
            at, self.matched = min(hits)
            return buffer[:at], True
        keep = partial_suffix(buffer, self._stops)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    @property
    def held(self) -> int:
        return len(self._held)


# ---------------------------------------------------------------- one choice


def _unexpected_abort(delta: TokenDelta) -> Exception:
    # We only abort by closing the stream, after which we stop reading; an
    # abort seen here came from the engine (shutting down or draining).
    return EngineUnavailable("the engine aborted the request")


def _failed(delta: TokenDelta) -> Exception:
    return generation_failed(delta.error)


def _overloaded(delta: TokenDelta) -> Exception:
    return EngineOverloaded(delta.error or "the engine's queue is full")


def _too_large(delta: TokenDelta) -> Exception:
    return request_too_large(delta.error or "the request exceeds the engine's limits")


# Engine finish reasons that end a choice in error, and how.
_FAILURES = {"abort": _unexpected_abort, "error": _failed, "overloaded": _overloaded, "too_large": _too_large}


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
    logprobs: list[TokenLogprob] | None = None
    # Tool calls completed in this piece (chat with tools).
    tool_calls: list[ToolCall] | None = None
    # Reasoning text in this piece (a thinking model's <think> part), apart from ``text``.
    reasoning: str = ""


@dataclass(frozen=True)
class FinishedChoice:
    index: int
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning: str = ""  # the whole reasoning text, apart from ``text``
    # The logprobs of the answer's tokens: the pieces that carry ``text``, and the last
    # tokens' that completed no text (not those of pieces of reasoning or calls only).
    text_logprobs: list[TokenLogprob] | None = None


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
        tools: Splitter | None = None,
        reasoning: ReasoningSplitter | None = None,
    ) -> None:
        self.index = index
        self.prompt_group = prompt_group  # completions: which prompt this choice answers
        self.stream = stream
        self._detokenizer = detokenizer
        self._stops = StopMatcher(stops)
        self._want_logprobs = logprobs
        self._tools = tools  # cuts tool calls out of the text
        self._reasoning = reasoning  # parts reasoning from the answer; stops and tools see the answer only
        self._held: list[TokenLogprob] = []  # logprobs of tokens whose text is not out yet
        self._ends: list[int] = []  # end offset of each held token's text
        self._produced = 0  # characters detokenized so far
        self._emitted = 0  # characters detokenized and no longer held back
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._seen_first = False

    def _detokenize(self, delta: TokenDelta) -> str:
        if not self._want_logprobs:
            text = self._detokenizer.add(delta.token_ids)
            self._produced += len(text)
            return text
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

    def _release(self, *, upto_start: int | None = None, all_: bool = False) -> list[TokenLogprob] | None:
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
            self.completion_tokens += len(delta.token_ids)  # reasoning tokens count as output
            if self._reasoning is not None and self._reasoning.counter is not None:
                self._reasoning.counter.feed(delta.token_ids)
            text = self._detokenize(delta)
            final = delta.finish_reason is not None
            if final:
                tail = self._detokenizer.finalize()
                text += tail
                self._produced += len(tail)
            reasoning, answer = self._split(text, final=final)
            held = self._stops.held
            out, matched = self._stops.feed(answer)
            if matched:
                # Where the stop string begins, in the detokenized text.
                stop_at = self._produced - self._reasoning_held() - (held + len(answer) - len(out))
                yield from self._pieces(reasoning, out, self._release(upto_start=stop_at), final=True)
                self._finish("stop")
                self.stream.close()  # aborts the rest of the generation in the engine
                return
            if delta.finish_reason is not None:
                out += self._stops.flush()
                yield from self._pieces(reasoning, out, self._release(all_=True), final=True)
                self._finish(delta.finish_reason)
                return
            self._emitted = self._produced - self._reasoning_held() - self._stops.held
            if out or reasoning:
                yield from self._pieces(reasoning, out, self._release(), final=False)
                if self._tools is not None and self._tools.done:
                    self._finish("stop")  # the one call allowed is complete
                    self.stream.close()
                    return
        raise EngineUnavailable(f"request {self.stream.request_id} ended without a final message")

    def _split(self, text: str, *, final: bool) -> tuple[str, str]:
        """(reasoning, answer) of newly detokenized text."""
        if self._reasoning is None:
            return "", text
        reasoning, answer = self._reasoning.feed(text)
        if final:
            rest_reasoning, rest_answer = self._reasoning.flush()
            reasoning, answer = reasoning + rest_reasoning, answer + rest_answer
        return reasoning, answer

    @property
    def reasoning_tokens(self) -> int | None:
        """How many output tokens were reasoning; None when reasoning is not split."""
        if self._reasoning is None or self._reasoning.counter is None:
            return None
        return self._reasoning.counter.count

    def _reasoning_held(self) -> int:
        return self._reasoning.held if self._reasoning is not None else 0

    def _pieces(
        self, reasoning: str, text: str, released: list[TokenLogprob] | None, *, final: bool
    ) -> Iterator[Piece]:
        calls: list[ToolCall] = []
        if self._tools is not None:
            split = self._tools.feed(text)
            if final:
                split += self._tools.flush()
            # gpt-oss's analysis channel is reasoning the tool splitter finds.
            text, calls, more_reasoning = split
            reasoning += more_reasoning
        if text or released or calls or reasoning:
            yield Piece(text, released, calls or None, reasoning)

    def _finish(self, reason: str) -> None:
        # OpenAI: a response that ends after tool calls finishes with "tool_calls".
        made_calls = self._tools is not None and self._tools.calls > 0
        self.finish_reason = "tool_calls" if reason == "stop" and made_calls else reason

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended this choice, if one did."""
        return self._stops.matched

    def pieces(self) -> Iterator[str]:
        """The text of ``parts()``."""
        return (part.text for part in self.parts())

    def finish(self) -> FinishedChoice:
        """Run to the end (non-streaming)."""
        texts: list[str] = []
        reasoning: list[str] = []
        logprobs: list[TokenLogprob] | None = [] if self._want_logprobs else None
        text_logprobs: list[TokenLogprob] | None = [] if self._want_logprobs else None
        calls: list[ToolCall] = []
        for part in self.parts():
            texts.append(part.text)
            reasoning.append(part.reasoning)
            if logprobs is not None and text_logprobs is not None and part.logprobs:
                logprobs.extend(part.logprobs)
                if part.text or not (part.reasoning or part.tool_calls):
                    text_logprobs.extend(part.logprobs)
            calls += part.tool_calls or []
        assert self.finish_reason is not None
        return FinishedChoice(
            self.index,
            "".join(texts),
            self.finish_reason,
            logprobs,
            calls or None,
            "".join(reasoning),
            text_logprobs,
        )

    def text(self) -> str:
        return "".join(self.pieces())


def usage_counts(prompt_lengths: Sequence[int], runs: Sequence[ChoiceRun]) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens. A prompt counts once however many
    choices it has; its cached count is its first choice's."""
    cached: dict[int, int] = {}
    for run in runs:
        cached.setdefault(run.prompt_group, run.cached_tokens)
    return sum(prompt_lengths), sum(r.completion_tokens for r in runs), sum(cached.values())
