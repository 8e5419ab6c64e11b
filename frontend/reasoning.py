"""Reasoning apart from the answer: a thinking model's ``<think>`` … ``</think>``.

mlx-lm infers the markers from the vocabulary (tokenizer_utils._infer_thinking)
and starts a response inside reasoning when the prompt leaves a start marker
open (server.py: a template such as DeepSeek-R1's opens ``<think>`` in the
generation prompt, so the model writes only the end marker). The split here
is mlx-lm's TextStateMachine for those two states, on streamed text: a marker
may arrive split over several pieces, so text that could begin one is held
back until the next piece decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from frontend.errors import invalid_request, unsupported
from frontend.text_scan import partial_suffix

if TYPE_CHECKING:
    from frontend.tokenization import Tokenization

# OpenAI's reasoning_effort values -> thinking on or off, for a template that
# switches it (enable_thinking): "none" turns it off; any effort, even
# "minimal" (which OpenAI's models still think a little at), turns it on.
EFFORT_THINKING = {"none": False, "minimal": True, "low": True, "medium": True, "high": True, "xhigh": True}


def effort_thinking(effort: str, param: str) -> bool:
    """Thinking on or off for a reasoning effort (400 for a value OpenAI does not define)."""
    if effort not in EFFORT_THINKING:
        raise invalid_request(f"{param} must be one of {', '.join(EFFORT_THINKING)}", param=param)
    return EFFORT_THINKING[effort]


def thinking_switch(wanted: bool | None, *, thinks: bool, can_toggle: bool, param: str) -> bool | None:
    """The ``thinking`` to render the prompt with (Tokenization.render_chat).

    None when nothing is asked or the model does it anyway; a 400 naming
    ``param`` when the model cannot do what is asked (a template without a
    thinking switch).
    """
    if wanted is None or can_toggle:
        return wanted
    if wanted == thinks:
        return None
    what = "turn thinking off" if thinks else "think"
    raise unsupported(param, f"{param} is not supported: this model cannot {what} (its chat template has no switch)")


def effort_switch(effort: str | None, tok: Tokenization, param: str) -> bool | None:
    """A reasoning effort as the ``thinking`` to render with; None where the
    template takes the effort as its own variable (gpt-oss) or none is asked."""
    if effort is None or tok.template_mentions("reasoning_effort"):
        return None
    wanted = effort_thinking(effort, param)
    return thinking_switch(wanted, thinks=tok.has_thinking, can_toggle=tok.can_toggle_thinking, param=param)


@dataclass(frozen=True)
class ThinkingMarkers:
    """A thinking model's markers, as text and as the token ids they encode to."""

    start: str
    end: str
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]

    def opened_by(self, prompt_ids: Sequence[int]) -> bool:
        """Whether the prompt ends inside reasoning (its last start marker is after its last end marker)."""
        return _rfind(prompt_ids, self.start_ids) > _rfind(prompt_ids, self.end_ids)

    def splitter(
        self, prompt_ids: Sequence[int], exits: Sequence[str] = (), exit_ids: Sequence[int] = ()
    ) -> ReasoningSplitter:
        """A splitter for one response to ``prompt_ids``; ``exits``: tool-call start markers
        (their single token ids, where they have one, in ``exit_ids``)."""
        inside = self.opened_by(prompt_ids)
        counter = ReasoningTokens(self.start_ids, self.end_ids, exit_ids, inside=inside)
        return ReasoningSplitter(self.start, self.end, inside=inside, exits=exits, counter=counter)


def _rfind(ids: Sequence[int], needle: Sequence[int]) -> int:
    """Start of the last occurrence of ``needle`` in ``ids``, -1 if none."""
    n = len(needle)
    if n == 0:
        return -1
    first = needle[0]
    for i in range(len(ids) - n, -1, -1):
        if ids[i] == first and tuple(ids[i : i + n]) == tuple(needle):
            return i
    return -1


class ReasoningTokens:
    """Counts the output tokens that are reasoning (markers included), on token ids:
    exact where detokenized text would blur token edges."""

    def __init__(
        self, start_ids: Sequence[int], end_ids: Sequence[int], exit_ids: Sequence[int] = (), *, inside: bool
    ) -> None:
        self._start = tuple(start_ids)
        self._end = tuple(end_ids)
        self._exits = frozenset(exit_ids)
        self._inside = inside
        self._tail: tuple[int, ...] = ()  # the last ids, enough to see a marker of several tokens
        self._width = max(len(self._start), len(self._end), 1)
        self.count = 0

    def feed(self, token_ids: Sequence[int]) -> None:
        for token_id in token_ids:
            self._tail = (*self._tail, token_id)[-self._width :]
            if self._inside:
                if token_id in self._exits:
                    self._inside = False
                    continue
                self.count += 1
                self._inside = self._tail[-len(self._end) :] != self._end
            elif self._tail[-len(self._start) :] == self._start:
                self._inside = True
                self.count += len(self._start)


class ReasoningSplitter:
    """Streamed text -> (reasoning, answer), markers dropped.

    Outside reasoning a start marker opens it; inside, an end marker closes
    it, and so does an ``exits`` marker (a tool call's start: mlx-lm lets a
    call begin inside reasoning), which stays in the answer text for the
    tool-call parser. Text that may be the beginning of the marker
    awaited is held until the next piece, or ``flush`` at the end. The
    whitespace templates and models put around the markers ("<think>\\n",
    "\\n</think>\\n\\n") is trimmed from both ends of the reasoning and from the
    start of the answer after it, so neither begins with blank lines.
    """

    def __init__(
        self,
        start: str,
        end: str,
        *,
        inside: bool,
        exits: Sequence[str] = (),
        counter: ReasoningTokens | None = None,
    ) -> None:
        self.counter = counter  # reasoning tokens, when the markers' ids are known
        self._start = start
        self._end = end
        self._exits = tuple(e for e in exits if e)
        self.inside = inside
        self._held = ""  # a possible beginning of the marker awaited
        self._spaces = ""  # the reasoning's trailing whitespace, dropped if the reasoning ends here
        self._leading = inside  # strip whitespace from the start of this part

    @property
    def held(self) -> int:
        """Characters fed but not yet given out (or dropped)."""
        return len(self._held) + len(self._spaces)

    def feed(self, text: str) -> tuple[str, str]:
        buffer = self._held + text
        reasoning: list[str] = []
        answer: list[str] = []
        while True:
            markers = (self._end, *self._exits) if self.inside else (self._start,)
            i, marker = min(((buffer.find(m), m) for m in markers if m in buffer), default=(-1, ""))
            cut = i if i >= 0 else len(buffer) - partial_suffix(buffer, markers)
            (reasoning if self.inside else answer).append(self._part(buffer[:cut]))
            if i < 0:
                self._held = buffer[cut:]
                break
            # The end and start markers go; an exit marker begins the answer.
            buffer = buffer[i + len(marker) :] if marker in (self._start, self._end) else buffer[i:]
            self.inside, self._spaces, self._leading = not self.inside, "", True
        return "".join(reasoning), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """What was held at the end of the output: text after all."""
        text = self._part(self._held)
        self._held = self._spaces = ""
        return (text, "") if self.inside else ("", text)

    def _part(self, text: str) -> str:
        if self._leading:
            text = text.lstrip()
            self._leading = not text
        if not self.inside:
            return text
        body = text.rstrip()
        if not body:
            self._spaces += text
            return ""
        out, self._spaces = self._spaces + body, text[len(body) :]
        return out
