"""How each model family writes tool calls: markers, the grammar of one call, and the parse.

The names are mlx-lm's tool parser names (``mlx_lm/tool_parsers/<name>.py``,
inferred from the chat template), plus ``harmony`` (gpt-oss). Parsing is
mlx-lm's own ``parse_tool_call`` (``frontend.tool_parsers``); what is here is
only what mlx-lm does not have: the Lark grammar (llguidance) that forces a
call in the format. A format whose calls cannot be written by a grammar
(arguments that are not JSON text) has ``call`` None: forcing a call then
gets a 400.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from frontend.constraints import JSON_LAYOUT


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class Split(NamedTuple):
    """One piece of output, split: answer text, completed calls, reasoning text."""

    text: str = ""
    calls: list[ToolCall] = []
    reasoning: str = ""

    def __add__(self, other: tuple[Any, ...]) -> Split:
        text, calls, reasoning = other
        return Split(self.text + text, self.calls + calls, self.reasoning + reasoning)


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict[str, Any]


# Writes one marker or literal into a grammar: a token (``<[id]>``) where the tokenizer has it as one.
Literal = Callable[[str], str]
# Lark for one call of any of the functions, between the format's markers.
CallGrammar = Callable[[Sequence[Function], Literal], str]


@dataclass(frozen=True)
class ToolFormat:
    start: str
    end: str  # "" (Mistral): the calls run to the end of the output
    call: CallGrammar | None  # None: a call cannot be forced in this format
    wrap_each: bool = True  # each call has its own start/end; else one section holds all calls
    separator: str = ""  # between two calls
    markers: tuple[str, ...] = ()  # the format's special pieces (inside calls too) the parser needs to see
    parallel: bool = True  # several calls in one turn
    answer_prefix: str = ""  # what a forced JSON answer (response_format) starts with

    def all_markers(self) -> tuple[str, ...]:
        return tuple(m for m in (self.start, self.end, *self.markers) if m)


def with_layout(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_LAYOUT, **schema.get("x-guidance", {})}}


def _json(schema: dict[str, Any]) -> str:
    return f"%json{json.dumps(with_layout(schema))}"


def _alternatives(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


def _named_object(functions: Sequence[Function]) -> str:
    """``{"name": ..., "arguments": {...}}`` for any of the functions."""
    schemas = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return _json(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


def json_object_call(functions: Sequence[Function], lit: Literal) -> str:
    # json_tools writes it; glm47, laguna and longcat parse it too (their JSON fallback).
    return f'"\\n" {_named_object(functions)} "\\n"'


def mistral_call(functions: Sequence[Function], lit: Literal) -> str:
    # mistral.py's header form: name[ARGS]{json}
    return _alternatives([f"{json.dumps(f.name)} {lit('[ARGS]')} {_json(f.parameters)}" for f in functions])


def kimi_k2_call(functions: Sequence[Function], lit: Literal) -> str:
    # kimi_k2.py: <|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{json}<|tool_call_end|>
    return _alternatives(
        [
            f"{lit('<|tool_call_begin|>')} {json.dumps(f'functions.{f.name}:')} /[0-9]/ "
            f"{lit('<|tool_call_argument_begin|>')} {_json(f.parameters)} {lit('<|tool_call_end|>')}"
            for f in functions
        ]
    )


def kimi_k3_call(functions: Sequence[Function], lit: Literal) -> str:
    # kimi_k3.py: a call with its arguments as one raw JSON object block.
    def one(f: Function) -> str:
        head = f'call tool="{f.name}" index="1"'
        return " ".join(
            (
                lit("<|open|>"), json.dumps(head), lit("<|sep|>"),
                lit("<|open|>"), json.dumps('json type="object"'), lit("<|sep|>"),
                _json(f.parameters),
                lit("<|close|>"), '"json"', lit("<|sep|>"),
                lit("<|close|>"), '"call"', lit("<|sep|>"),
            )
        )  # fmt: skip

    return _alternatives([one(f) for f in functions])


class CannotForce(ValueError):
    """A function whose parameters the format's grammar cannot write (the message says which)."""


# A string schema with only these keys can be written as raw text (XML-style formats).
_RAW_STRING_KEYS = {"type", "description", "title", "maxLength", "minLength"}
_ENUM_KEYS = {"type", "enum", "description", "title"}
_JSON_TYPES = {"integer", "number", "boolean", "object", "array"}


def _raw_value(name: str, schema: Any) -> str:
    """Lark for one argument written as text: strings raw, other types as JSON (as the parsers read them)."""
    if not isinstance(schema, dict):
        raise CannotForce(f"parameter {name!r} has no schema object")
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) and v for v in enum) and set(schema) <= _ENUM_KEYS:
        return _alternatives([json.dumps(v) for v in enum])
    if schema.get("type") == "string" and set(schema) <= _RAW_STRING_KEYS:
        low, high = max(int(schema.get("minLength", 1)), 1), schema.get("maxLength")
        return f"/[^<\\n]{{{low},{'' if high is None else int(high)}}}/"
    if schema.get("type") in _JSON_TYPES:
        return _json(schema)
    raise CannotForce(f"parameter {name!r} has a schema that cannot be written as raw text")


def _xml_arguments(f: Function, param: Callable[[str, str], str]) -> str:
    """Lark for a function's arguments, one ``param(key, value)`` per property, in schema order."""
    parameters = f.parameters
    if set(parameters) - {"type", "properties", "required", "additionalProperties", "description", "title"}:
        raise CannotForce(f"the parameters of {f.name!r} are not a plain object schema")
    properties = parameters.get("properties") or {}
    required = set(parameters.get("required") or [])
    if not required <= set(properties):
        raise CannotForce(f"{f.name!r} requires parameters it does not describe")
    parts = []
    for key, schema in properties.items():
        part = param(key, _raw_value(key, schema))
        parts.append(part if key in required else f"({part})?")
    return " ".join(parts)


def qwen3_coder_call(functions: Sequence[Function], lit: Literal) -> str:
    # qwen3_coder.py: <function=NAME> with one <parameter=KEY>VALUE</parameter> per argument, one per line.
    def param(key: str, value: str) -> str:
        return f"{json.dumps(f'<parameter={key}>' + chr(10))} {value} {json.dumps(chr(10) + '</parameter>' + chr(10))}"

    return _alternatives(
        [
            f'{json.dumps(f"{chr(10)}<function={f.name}>{chr(10)}")} {_xml_arguments(f, param)} "</function>\\n"'
            for f in functions
        ]
    )


def minimax_m2_call(functions: Sequence[Function], lit: Literal) -> str:
    # minimax_m2.py: <invoke name="NAME"> with one <parameter name="KEY">VALUE</parameter> per argument.
    def param(key: str, value: str) -> str:
        return f"{json.dumps(f'<parameter name={json.dumps(key)}>')} {value} {json.dumps('</parameter>' + chr(10))}"

    return _alternatives(
        [
            f"{json.dumps(f'{chr(10)}<invoke name={json.dumps(f.name)}>{chr(10)}')} {_xml_arguments(f, param)} "
            '"</invoke>\\n"'
            for f in functions
        ]
    )


_KIMI_K3_MARKERS = ("<|open|>", "<|close|>", "<|sep|>")

# mlx-lm parser name -> what the frontend needs beyond mlx-lm's parse_tool_call.
# qwen3_coder and minimax_m2 write arguments one by one as text: forced where
# each argument's schema is a plain string, a string enum or a JSON-typed
# value. minicpm5, muse_spark, Python calls (pythonic) and Gemma's own syntax
# are parsed but not forced.
MLX_LM_FORMATS: dict[str, ToolFormat] = {
    "json_tools": ToolFormat("<tool_call>", "</tool_call>", json_object_call, separator="\n"),
    "glm47": ToolFormat("<tool_call>", "</tool_call>", json_object_call, separator="\n"),
    "laguna": ToolFormat("<tool_call>", "</tool_call>", json_object_call, separator="\n"),
    "longcat": ToolFormat("<longcat_tool_call>", "</longcat_tool_call>", json_object_call, separator="\n"),
    "mistral": ToolFormat("[TOOL_CALLS]", "", mistral_call, wrap_each=False, markers=("[ARGS]",)),
    "kimi_k2": ToolFormat(
        "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>",
        kimi_k2_call,
        wrap_each=False,
        markers=("<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"),
    ),
    "kimi_k3": ToolFormat(
        "<|open|>tools<|sep|>", "<|close|>tools<|sep|>", kimi_k3_call, wrap_each=False, markers=_KIMI_K3_MARKERS
    ),
    "qwen3_coder": ToolFormat("<tool_call>", "</tool_call>", qwen3_coder_call, separator="\n"),
    "minimax_m2": ToolFormat("<minimax:tool_call>", "</minimax:tool_call>", minimax_m2_call, wrap_each=False),
    "minicpm5": ToolFormat("<function name=", "</function>", None),
    "muse_spark": ToolFormat("<atem:function_calls>", "</atem:function_calls>", None),
    "pythonic": ToolFormat("<|tool_call_start|>", "<|tool_call_end|>", None),
    "gemma4": ToolFormat("<|tool_call>", "<tool_call|>", None, markers=('<|"|>',)),
    "function_gemma": ToolFormat("<start_function_call>", "<end_function_call>", None, markers=("<escape>",)),
}


def literal_writer(markers: Sequence[str], token_id: Callable[[str], int | None]) -> Literal:
    """Writes text into a grammar, each marker in it as its token when the tokenizer has one.

    llguidance keeps added tokens (special or not, as Qwen's ``<tool_call>``)
    out of byte matching: a grammar asking for the marker's bytes would
    force that token, then refuse it.
    """
    ids = {m: token_id(m) for m in markers}
    atoms = sorted((m for m, i in ids.items() if i is not None), key=len, reverse=True)
    pattern = re.compile("(" + "|".join(re.escape(a) for a in atoms) + ")") if atoms else None

    def lit(text: str) -> str:
        parts = pattern.split(text) if pattern is not None else [text]
        return " ".join(f"<[{ids[p]}]>" if p in atoms else json.dumps(p) for p in parts if p)

    return lit
