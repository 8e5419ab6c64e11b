"""gpt-oss's Harmony output: channels split into reasoning, tool calls and the answer.

The prompt ends with ``<|start|>assistant``; the model then writes messages
``<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>json]<|message|>BODY``
ended by ``<|end|>`` (more follows, after ``<|start|>assistant``),
``<|call|>`` (a tool call; the turn ends) or ``<|return|>`` (the answer; the
turn ends). The recipient may also sit in the role header
(``<|start|>assistant to=functions.f<|channel|>commentary``).

* ``analysis``: reasoning (``Split.reasoning``);
* a message to ``functions.NAME``: a tool call, its body the JSON arguments;
* ``final`` (and ``commentary`` without a recipient: preambles): the answer.

mlx-lm has no Harmony parser; this follows the format of openai/harmony and
vLLM's gpt-oss parsing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from frontend.tool_formats import Function, Literal, Split, ToolCall, ToolFormat, new_call_id, with_layout

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, CALL, RETURN = "<|end|>", "<|call|>", "<|return|>"
MARKERS = (START, CHANNEL, MESSAGE, CONSTRAIN, END, CALL, RETURN)
_MESSAGE_ENDS = (END, CALL, RETURN)
_HEADER_STARTS = (START, CHANNEL)
_RECIPIENT = re.compile(r"\bto=(\S+?)(?=\s|<\||$)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")
_FUNCTIONS = "functions."


def _call(functions: Sequence[Function], lit: Literal) -> str:
    # What gpt-oss writes for a call: the recipient in the channel header, JSON arguments.
    def one(f: Function) -> str:
        schema = json.dumps(with_layout(f.parameters))
        return (
            f"{lit(CHANNEL)} {json.dumps(f'commentary to={_FUNCTIONS}{f.name} ')} {lit(CONSTRAIN)} "
            f'"json" {lit(MESSAGE)} %json{schema} {lit(CALL)}'
        )

    parts = [one(f) for f in functions]
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


# <|call|> ends the turn: one call per turn. A forced JSON answer is the final channel's message.
FORMAT = ToolFormat(
    "", "", _call, wrap_each=False, markers=MARKERS, parallel=False, answer_prefix=f"{CHANNEL}final{MESSAGE}"
)


def _first(buffer: str, markers: Sequence[str]) -> tuple[int, str]:
    found = [(i, m) for m in markers if (i := buffer.find(m)) >= 0]
    return min(found) if found else (-1, "")


def _held_suffix(buffer: str, markers: Sequence[str]) -> int:
    """Length of the longest end of ``buffer`` that may begin one of ``markers``."""
    for size in range(min(max(len(m) for m in markers) - 1, len(buffer)), 0, -1):
        if any(m.startswith(buffer[-size:]) for m in markers):
            return size
    return 0


@dataclass
class HarmonySplitter:
    """Splits streamed Harmony output into answer text, reasoning and tool calls.

    Reasoning and answer text stream as they come (a possible marker at the
    end is held back); a call is released when its message ends (or the
    output does). Text outside any message is answer text.
    """

    single: bool = False
    calls: int = 0
    done: bool = False
    _buffer: str = ""
    _state: str = "outside"  # outside | header | message
    _channel: str = ""
    _recipient: str = ""
    _header: str = ""

    def feed(self, text: str) -> Split:
        self._buffer += text
        out = Split()
        while not self.done:
            step = self._step()
            if step is None:
                break
            out += step
        return out

    def _step(self) -> Split | None:
        """Consume what the buffer decides; None when it needs more text."""
        if self._state == "outside":
            i, marker = _first(self._buffer, _HEADER_STARTS + _MESSAGE_ENDS)
            if i < 0:
                keep = _held_suffix(self._buffer, MARKERS)
                text, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
                return Split(text) if text else None
            text, self._buffer = self._buffer[:i], self._buffer[i + len(marker) :]
            if marker in _HEADER_STARTS:
                self._state, self._header = "header", marker
            return Split(text)
        if self._state == "header":
            i = self._buffer.find(MESSAGE)
            if i < 0:
                return None
            self._header += self._buffer[:i]
            self._buffer = self._buffer[i + len(MESSAGE) :]
            channel, recipient = _CHANNEL_NAME.search(self._header), _RECIPIENT.search(self._header)
            self._channel = channel.group(1) if channel else ""
            self._recipient = recipient.group(1) if recipient else ""
            self._state = "message"
            return Split()
        return self._message()

    def _message(self) -> Split | None:
        i, marker = _first(self._buffer, _MESSAGE_ENDS + (START,))
        if self._recipient:  # a call: released whole, at its end
            if i < 0:
                return None
            body, self._buffer = self._buffer[:i], self._buffer[i + len(marker) :]
            self._state = "outside"
            return self._tool_call(body)
        if i < 0:
            keep = _held_suffix(self._buffer, MARKERS)
            body, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
            return self._text(body) if body else None
        body, self._buffer = self._buffer[:i], self._buffer[i + len(marker) :]
        self._state = "outside" if marker != START else "header"
        self._header = marker if marker == START else ""
        return self._text(body)

    def _text(self, body: str) -> Split:
        return Split(reasoning=body) if self._channel == "analysis" else Split(body)

    def _tool_call(self, body: str) -> Split:
        name = self._recipient.removeprefix(_FUNCTIONS)
        try:
            json.loads(body)
        except ValueError:
            return Split(body)  # not JSON arguments: kept as text, nothing dropped
        if not self._recipient.startswith(_FUNCTIONS):
            return Split(body)  # a built-in tool (browser, python) we do not run
        self.calls += 1
        self.done = self.single
        return Split(calls=[ToolCall(new_call_id(), name, body.strip())])

    def flush(self) -> Split:
        """The end of the output ends the open message (``<|call|>`` / ``<|return|>`` may be EOS, unseen)."""
        if self.done:
            return Split()
        rest, self._buffer = self._buffer, ""
        if self._state == "message":
            self._state = "outside"
            return self._tool_call(rest) if self._recipient else self._text(rest)
        self._state = "outside"
        return Split() if self._header else Split(rest)
