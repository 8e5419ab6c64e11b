"""tools / tool_choice: validation, the grammar that forces a call, and calls parsed out of text.

A model writes tool calls in its own format; mlx-lm infers which from the
chat template, and the engine announces it in ModelInfo (``tool_parser``:
an mlx-lm parser name, or ``harmony`` for gpt-oss). Calls are parsed with
mlx-lm's own parsers (``frontend.tool_parsers``, loaded without mlx) or the
Harmony splitter (``frontend.harmony``); ``frontend.tool_formats`` has each
format's markers and call grammar.

tool_choice "auto": the output is free; calls are cut out of the text.
"required" / a named function: a grammar (llguidance Lark with ``%json``)
makes the output one or more calls in the model's format whose arguments
match the function's JSON schema; the grammar then ends, so EOS follows.
A format whose arguments are not JSON cannot be forced: 400. "none": tools
reach the template, the output is plain text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from frontend import harmony, tool_parsers
from frontend.constraints import check_constraint
from frontend.errors import invalid_request, unsupported
from frontend.text_scan import partial_suffix
from frontend.tool_formats import (
    MLX_LM_FORMATS,
    CannotForce,
    Function,
    Literal,
    Split,
    ToolCall,
    ToolFormat,
    literal_writer,
    new_call_id,
    with_layout,
)
from ipc.messages import Constraint, ModelInfo

__all__ = ["MAX_TOOLS", "TOOL_FORMATS", "Split", "ToolCall", "ToolCallSplitter", "ToolPlan", "plan_tools"]

# OpenAI: function names are a-z, A-Z, 0-9, underscores and dashes, at most 64.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Largest number of tools per request (OpenAI allows 128).
MAX_TOOLS = 128
# A function without parameters takes an empty object.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class Splitter(Protocol):
    """Cuts calls (and, for Harmony, reasoning) out of streamed output."""

    calls: int
    done: bool

    def feed(self, text: str) -> Split: ...

    def flush(self) -> Split: ...


# ---------------------------------------------------------------- the request's plan

# Every format the frontend knows, by the parser name the engine announces.
TOOL_FORMATS: dict[str, ToolFormat] = {**MLX_LM_FORMATS, "harmony": harmony.FORMAT}


@dataclass
class ToolPlan:
    """What one chat request does with its tools."""

    template_tools: list[dict[str, Any]] | None = None  # what the chat template renders
    parser: str = ""  # the format's name; "" when no calls are parsed out of the text
    format: ToolFormat | None = None
    single: bool = False  # at most one call (parallel_tool_calls false or a named function)
    constraint: Constraint | None = None
    marker_ids: tuple[int, ...] = ()  # the markers' own tokens: their text must reach the splitter

    def splitter(self) -> Splitter | None:
        if self.format is None:
            return None
        if self.parser == "harmony":
            return harmony.HarmonySplitter(single=self.single)
        parse = _mlx_lm_parse(self.parser, self.template_tools)
        return ToolCallSplitter(self.format.start, self.format.end, parse, single=self.single)


def _mlx_lm_parse(name: str, tools: list[dict[str, Any]] | None) -> Callable[[str], list[tuple[str, str]] | None]:
    module = tool_parsers.load(name)
    assert module is not None  # plan_tools checked it

    def parse(body: str) -> list[tuple[str, str]] | None:
        try:
            return tool_parsers.as_calls(module.parse_tool_call(body, tools))
        except Exception:  # mlx-lm's parsers raise ValueError, JSONDecodeError, AttributeError...
            return None  # the text stays in the content

    return parse


def _functions(tools: Sequence[Any]) -> list[Function]:
    if len(tools) > MAX_TOOLS:
        raise invalid_request(f"at most {MAX_TOOLS} tools are allowed", param="tools")
    out: list[Function] = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid_request("each tool must be an object with type 'function'", param=f"{param}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid_request("a function tool needs a 'function' object", param=f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise invalid_request(
                "function names are 1-64 letters, digits, underscores or dashes", param=f"{param}.function.name"
            )
        if any(f.name == name for f in out):
            raise invalid_request(f"two tools are named {name!r}", param=f"{param}.function.name")
        parameters = function.get("parameters", _NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise invalid_request(
                "function parameters must be a JSON schema object", param=f"{param}.function.parameters"
            )
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid_request("a function description must be a string", param=f"{param}.function.description")
        out.append(Function(name, parameters))
    return out


def _chosen(tool_choice: Any, functions: list[Function]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", the named function)."""
    if tool_choice is None:
        return ("auto" if functions else "none"), None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise invalid_request("tool_choice.function.name is required", param="tool_choice.function.name")
        if all(f.name != name for f in functions):
            raise invalid_request(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return "named", name
    raise invalid_request(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


def _model_format(model: ModelInfo) -> ToolFormat:
    name = model.tool_parser or ""
    if name == "harmony":
        return harmony.FORMAT
    module = tool_parsers.load(name) if name else None
    if module is None:
        why = (
            f"its tool-call format ({model.tool_parser}) is not supported"
            if model.tool_parser
            else "its chat template has no tool-call format"
        )
        raise unsupported("tools", f"tool calling is not available for this model: {why}")
    # A parser newer than this table: calls are parsed by its markers, not forced.
    return TOOL_FORMATS.get(name) or ToolFormat(module.tool_call_start, module.tool_call_end, None)


def plan_tools(
    tools: list[Any] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    model: ModelInfo,
    marker_token_id: Callable[[str], int | None],
    answer: Constraint | None = None,
) -> ToolPlan:
    """Validate tools/tool_choice; decide template tools, parsing and the grammar.

    ``marker_token_id(text)``: the id of the added token (special or not)
    spelled ``text``, else None. ``answer``: the
    response_format constraint; with "auto" the output is then either calls
    or an answer in that format ("required"/named: calls, the answer comes
    in a later turn).
    """
    functions = _functions(tools or [])
    choice, name = _chosen(tool_choice, functions)
    if not functions and choice != "none":
        raise invalid_request("tool_choice requires tools", param="tool_choice")
    plan = ToolPlan(template_tools=list(tools or []) if functions else None)
    # Harmony output is always split (analysis is reasoning), with or without tools.
    if choice == "none" and model.tool_parser != "harmony":
        return plan  # the template shows the tools; the answer is text
    fmt = _model_format(model)
    plan.parser, plan.format = model.tool_parser or "", fmt
    plan.single = choice == "named" or parallel_tool_calls is False or not fmt.parallel
    lit = literal_writer(fmt.all_markers(), marker_token_id)
    plan.marker_ids = tuple(i for i in map(marker_token_id, fmt.all_markers()) if i is not None)
    forced = choice in ("required", "named")
    if (forced or answer is not None) and fmt.call is None:
        raise invalid_request(
            f"tool_choice {choice!r} cannot be enforced for this model: its tool-call format ({plan.parser}) "
            "does not write arguments as JSON, so no grammar can force a call",
            param="tool_choice",
        )
    try:
        if forced:
            chosen = [f for f in functions if name is None or f.name == name]
            grammar = _calls_grammar(chosen, plan, lit)
            plan.constraint = check_constraint(Constraint(kind="lark", text=grammar), "tools")
        elif answer is not None and (functions or fmt.answer_prefix):
            assert answer.kind == "json_schema"  # response_format makes only these
            usable = functions if choice != "none" else []
            grammar = _calls_grammar(usable, plan, lit, json.loads(answer.text))
            plan.constraint = check_constraint(Constraint(kind="lark", text=grammar), "response_format")
    except CannotForce as error:
        raise invalid_request(
            f"tool_choice {choice!r} cannot be enforced in this model's tool-call format ({plan.parser}): {error}",
            param="tool_choice",
        ) from None
    return plan


def _calls_grammar(
    functions: list[Function],
    plan: ToolPlan,
    lit: Literal,
    answer_schema: dict[str, Any] | None = None,
) -> str:
    """Lark: one call (or several) of the given functions in the model's format, nothing
    else; or, with ``answer_schema``, calls or one JSON answer (only the answer without functions)."""
    fmt = plan.format
    assert fmt is not None and fmt.call is not None
    answer = ""
    if answer_schema is not None:
        prefix = lit(fmt.answer_prefix) + " " if fmt.answer_prefix else ""
        answer = f"answer: {prefix}%json{json.dumps(with_layout(answer_schema))}\n"
        if not functions:
            return f"start: answer\n{answer}"
    start, end = (lit(m) if m else "" for m in (fmt.start, fmt.end))
    sep = json.dumps(fmt.separator) + " " if fmt.separator else ""
    many = "" if plan.single else f" ({sep}call)*"
    if fmt.wrap_each:
        rules = f"calls: call{many}\ncall: {' '.join(p for p in (start, 'fn', end) if p)}\n"
    else:
        rules = f"calls: {' '.join(p for p in (start, 'call' + many, end) if p)}\ncall: fn\n"
    rules += f"fn: {fmt.call(functions, lit)}\n"
    return f"start: calls | answer\n{rules}{answer}" if answer else f"start: calls\n{rules}"


# ---------------------------------------------------------------- cutting calls out of text


@dataclass
class ToolCallSplitter:
    """Splits streamed text into content and complete tool calls.

    Text that may be the start of a call marker is held back until the next
    piece decides; a call is released once its end marker arrives. A call
    whose body does not parse, or that never ends, stays in the content (no
    output is dropped). Whitespace right before or after a call is dropped,
    so an answer that is only calls has no content.
    """

    start: str
    end: str
    parse: Callable[[str], list[tuple[str, str]] | None]
    single: bool = False
    calls: int = 0
    _buffer: str = ""
    _inside: bool = False
    _spaces: str = ""  # trailing whitespace held back
    _after_call: bool = False  # nothing but whitespace since the last call
    done: bool = field(default=False)  # single: the one call is complete

    def feed(self, text: str) -> Split:
        """Content text and calls completed in this piece of output."""
        self._buffer += text
        content, calls = "", []
        while not self.done:
            if not self._inside:
                i = self._buffer.find(self.start)
                if i < 0:
                    keep = partial_suffix(self._buffer, (self.start,))
                    content += self._content(self._buffer[: len(self._buffer) - keep], before_call=False)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                content += self._content(self._buffer[:i], before_call=True)
                self._buffer = self._buffer[i + len(self.start) :]
                self._inside = True
            else:
                j = self._buffer.find(self.end) if self.end else -1  # no end marker: calls run to the end
                if j < 0:
                    break
                body, self._buffer = self._buffer[:j], self._buffer[j + len(self.end) :]
                self._inside = False
                text_, calls_ = self._call(body)
                content += text_
                calls += calls_
        return Split(content, calls)

    def _call(self, body: str) -> tuple[str, list[ToolCall]]:
        parsed = self.parse(body)
        if parsed is None:
            return self._content(self.start + body + self.end, before_call=False), []
        self.calls += len(parsed)
        self._spaces = ""
        self._after_call = True
        self.done = self.single
        return "", [
            ToolCall(new_call_id(), name, arguments) for name, arguments in parsed[: 1 if self.single else None]
        ]

    def flush(self) -> Split:
        """Content left at the end: held text, or a call that never ended
        (Mistral's calls have no end marker: they end here)."""
        if self.done:  # the one call allowed is out; what follows is not the answer
            return Split()
        calls: list[ToolCall] = []
        if self._inside and not self.end:
            body, self._buffer, self._inside = self._buffer, "", False
            out, calls = self._call(body)
            if calls:
                return Split(out, calls)
            return Split(out + self._flush_spaces())
        rest = (self.start if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        out = self._content(rest, before_call=False)
        return Split(out + self._flush_spaces(), calls)

    def _flush_spaces(self) -> str:
        out = "" if self._after_call else self._spaces
        self._spaces = ""
        return out

    def _content(self, text: str, *, before_call: bool) -> str:
        """Content to emit now: trailing whitespace is held until more text
        shows it is not just padding before a call (or after the last one)."""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
        body = text.rstrip()
        if before_call:
            # Held until the call parses (dropped) or turns out to be text (kept).
            out = self._spaces + body if body else ""
            self._spaces = text[len(body) :] if body else self._spaces + text
            return out
        if not body:
            self._spaces += text
            return ""
        out, self._spaces = self._spaces + body, text[len(body) :]
        return out
