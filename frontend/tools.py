"""tools / tool_choice: validation, the grammar that forces a call, and calls parsed out of text.

A model writes tool calls in its own format; mlx-lm infers which from the
chat template, and the engine announces it in ModelInfo (``tool_parser``,
``tool_call_start``/``tool_call_end``). The frontend must not import mlx-lm,
so the formats it can parse live here (``TOOL_FORMATS``); a model whose
format is not among them gets a 400 for tools, never unparsed calls.

tool_choice "auto": the output is free; calls are cut out of the text.
"required" / a named function: a grammar (llguidance Lark with ``%json``)
makes the output one or more calls whose arguments match the function's
JSON schema; the grammar then ends, so EOS follows. "none": tools reach the
template, the output is plain text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from frontend.constraints import JSON_LAYOUT, check_constraint
from frontend.errors import invalid_request, unsupported
from ipc.messages import Constraint, ModelInfo

# OpenAI: function names are a-z, A-Z, 0-9, underscores and dashes, at most 64.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Largest number of tools per request (OpenAI allows 128).
MAX_TOOLS = 128
# A function without parameters takes an empty object.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------- model formats


def _parse_json_tools(body: str) -> list[tuple[str, str]] | None:
    """mlx_lm.tool_parsers.json_tools: ``{"name": ..., "arguments": {...}}`` (or a list of them)."""
    try:
        parsed = json.loads(body.strip())
    except ValueError:
        return None
    items = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        out.append((item["name"], arguments))
    return out


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes a call: ``start + before + body + after + end``."""

    parse: Callable[[str], list[tuple[str, str]] | None]
    before: str = ""  # text the grammar puts between the start marker and the JSON body
    after: str = ""
    separator: str = ""  # between two calls


# mlx-lm tool parser name -> format. json_tools: Hermes, Qwen 2.5, ...:
# "<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>".
TOOL_FORMATS: dict[str, ToolFormat] = {
    "json_tools": ToolFormat(_parse_json_tools, before="\n", after="\n", separator="\n"),
}


# ---------------------------------------------------------------- the request's plan


@dataclass
class ToolPlan:
    """What one chat request does with its tools."""

    template_tools: list[dict[str, Any]] | None = None  # what the chat template renders
    start: str = ""
    end: str = ""
    format: ToolFormat | None = None  # None: no calls are parsed out of the text
    single: bool = False  # at most one call (parallel_tool_calls false or a named function)
    constraint: Constraint | None = None
    marker_ids: tuple[int, ...] = ()  # the markers' own tokens: their text must reach the splitter

    def splitter(self) -> ToolCallSplitter | None:
        if self.format is None:
            return None
        return ToolCallSplitter(self.start, self.end, self.format.parse, single=self.single)


@dataclass(frozen=True)
class _Function:
    name: str
    parameters: dict[str, Any]


def _functions(tools: Sequence[Any]) -> list[_Function]:
    if len(tools) > MAX_TOOLS:
        raise invalid_request(f"at most {MAX_TOOLS} tools are allowed", param="tools")
    out: list[_Function] = []
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
        out.append(_Function(name, parameters))
    return out


def _chosen(tool_choice: Any, functions: list[_Function]) -> tuple[str, str | None]:
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
    if not functions:
        if choice != "none":
            raise invalid_request("tool_choice requires tools", param="tool_choice")
        return ToolPlan()
    plan = ToolPlan(template_tools=list(tools or []))
    if choice == "none":
        return plan  # the template shows the tools; the answer is text
    fmt = TOOL_FORMATS.get(model.tool_parser or "")
    if fmt is None or not model.tool_call_start or not model.tool_call_end:
        why = (
            f"its tool-call format ({model.tool_parser}) is not supported yet"
            if model.tool_parser
            else "its chat template has no tool-call format"
        )
        raise unsupported("tools", f"tool calling is not available for this model: {why}")
    plan.start, plan.end, plan.format = model.tool_call_start, model.tool_call_end, fmt
    plan.single = choice == "named" or parallel_tool_calls is False
    markers = {text: marker_token_id(text) for text in (plan.start, plan.end)}
    plan.marker_ids = tuple(i for i in markers.values() if i is not None)
    if choice in ("required", "named"):
        chosen = [f for f in functions if name is None or f.name == name]
        grammar = _calls_grammar(chosen, plan, markers)
        plan.constraint = check_constraint(Constraint(kind="lark", text=grammar), "tools")
    elif answer is not None:
        assert answer.kind == "json_schema"  # response_format makes only these
        grammar = _calls_grammar(functions, plan, markers, json.loads(answer.text))
        plan.constraint = check_constraint(Constraint(kind="lark", text=grammar), "response_format")
    return plan


def _literal(text: str, markers: dict[str, int | None]) -> str:
    """A marker in the grammar: its token when the tokenizer has one, else its bytes.

    llguidance keeps added tokens (special or not, as Qwen's ``<tool_call>``)
    out of byte matching: a grammar asking for the marker's bytes would
    force that token, then refuse it.
    """
    token_id = markers.get(text)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def _call_schema(function: _Function) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _with_layout(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_LAYOUT, **schema.get("x-guidance", {})}}


def _calls_grammar(
    functions: list[_Function],
    plan: ToolPlan,
    markers: dict[str, int | None],
    answer_schema: dict[str, Any] | None = None,
) -> str:
    """Lark: one call (or several, separated) of the given functions, nothing
    else; or, with ``answer_schema``, calls or one JSON answer."""
    assert plan.format is not None
    schemas = [_call_schema(f) for f in functions]
    schema = _with_layout(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})
    start, end = _literal(plan.start, markers), _literal(plan.end, markers)
    body = " ".join(
        part
        for part in (
            start,
            json.dumps(plan.format.before) if plan.format.before else "",
            f"%json{json.dumps(schema)}",
            json.dumps(plan.format.after) if plan.format.after else "",
            end,
        )
        if part
    )
    many = "" if plan.single else f" ({json.dumps(plan.format.separator)} call)*" if plan.format.separator else " call*"
    start_rule = "start: calls" if answer_schema is None else "start: calls | answer"
    answer_rule = "" if answer_schema is None else f"answer: %json{json.dumps(_with_layout(answer_schema))}\n"
    return f"{start_rule}\ncalls: call{many}\ncall: {body}\n{answer_rule}"


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

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content text, calls completed) for this piece of output."""
        self._buffer += text
        content, calls = "", []
        while not self.done:
            if not self._inside:
                i = self._buffer.find(self.start)
                if i < 0:
                    keep = _partial_suffix(self._buffer, self.start)
                    content += self._content(self._buffer[: len(self._buffer) - keep], before_call=False)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                content += self._content(self._buffer[:i], before_call=True)
                self._buffer = self._buffer[i + len(self.start) :]
                self._inside = True
            else:
                j = self._buffer.find(self.end)
                if j < 0:
                    break
                body, self._buffer = self._buffer[:j], self._buffer[j + len(self.end) :]
                self._inside = False
                parsed = self.parse(body)
                if parsed is None:
                    content += self._content(self.start + body + self.end, before_call=False)
                    continue
                calls += [ToolCall(new_call_id(), name, arguments) for name, arguments in parsed]
                self.calls += len(parsed)
                self._spaces = ""
                self._after_call = True
                self.done = self.single
        return content, calls

    def flush(self) -> str:
        """Content left at the end: held text, or a call that never ended."""
        if self.done:  # the one call allowed is out; what follows is not the answer
            return ""
        rest = (self.start if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        out = self._content(rest, before_call=False)
        if not self._after_call:
            out += self._spaces
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


def _partial_suffix(buffer: str, marker: str) -> int:
    for size in range(min(len(marker) - 1, len(buffer)), 0, -1):
        if buffer.endswith(marker[:size]):
            return size
    return 0
