"""Every tool-call format: mlx-lm's parsers (loaded without mlx) and gpt-oss Harmony, on the
text each model family writes, streamed in pieces of any size; which formats a grammar can force."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from frontend import tool_parsers
from frontend.errors import APIError
from frontend.tool_formats import MLX_LM_FORMATS, Split
from frontend.tools import TOOL_FORMATS, Splitter, plan_tools
from tests.unit.fakes import make_model_info

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
PARIS = ("get_weather", {"city": "Paris", "days": 2})
TOKYO = ("get_weather", {"city": "Tokyo", "days": 1})

# What each format's model writes: "Checking." then two calls (as the parser modules' docstrings
# and their chat templates show them).
OUTPUTS: dict[str, str] = {
    "json_tools": (
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", "days": 1}}\n</tool_call>'
    ),
    "qwen3_coder": (
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nTokyo\n</parameter>\n<parameter=days>\n1\n</parameter>\n</function>\n</tool_call>"
    ),
    "glm47": (
        "Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call><tool_call>get_weather\n"
        "<arg_key>city</arg_key>\n<arg_value>Tokyo</arg_value>\n<arg_key>days</arg_key>\n<arg_value>1</arg_value>\n"
        "</tool_call>"
    ),
    "longcat": (
        "Checking.<longcat_tool_call>get_weather\n<longcat_arg_key>city</longcat_arg_key>\n"
        "<longcat_arg_value>Paris</longcat_arg_value>\n<longcat_arg_key>days</longcat_arg_key>\n"
        "<longcat_arg_value>2</longcat_arg_value>\n</longcat_tool_call><longcat_tool_call>"
        '{"name": "get_weather", "arguments": {"city": "Tokyo", "days": 1}}</longcat_tool_call>'
    ),
    "mistral": 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}get_weather[ARGS]{"city": "Tokyo", "days": 1}',
    "kimi_k2": (
        "Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris", "days": 2}<|tool_call_end|>'
        "<|tool_call_begin|>functions.get_weather:1"
        '<|tool_call_argument_begin|>{"city": "Tokyo", "days": 1}<|tool_call_end|><|tool_calls_section_end|>'
    ),
    "kimi_k3": (
        "Checking.<|open|>tools<|sep|>"
        '<|open|>call tool="get_weather" index="1"<|sep|>'
        '<|open|>argument key="city" type="string"<|sep|>Paris<|close|>argument<|sep|>'
        '<|open|>argument key="days" type="integer"<|sep|>2<|close|>argument<|sep|>'
        "<|close|>call<|sep|>"
        '<|open|>call tool="get_weather" index="2"<|sep|>'
        '<|open|>json type="object"<|sep|>{"city": "Tokyo", "days": 1}<|close|>json<|sep|>'
        "<|close|>call<|sep|><|close|>tools<|sep|>"
    ),
    "minimax_m2": (
        'Checking.<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
        '<parameter name="days">2</parameter>\n</invoke>\n<invoke name="get_weather">\n'
        '<parameter name="city">Tokyo</parameter>\n<parameter name="days">1</parameter>\n</invoke>\n'
        "</minimax:tool_call>"
    ),
    "minicpm5": (
        'Checking.<function name="get_weather"><param name="city">Paris</param><param name="days">2</param>'
        '</function><function name="get_weather"><param name="city">Tokyo</param><param name="days">1</param>'
        "</function>"
    ),
    "muse_spark": (
        'Checking.<atem:function_calls><atem:invoke name="get_weather"><atem:parameter name="city">"Paris"'
        '</atem:parameter><atem:parameter name="days">2</atem:parameter></atem:invoke>'
        '<atem:invoke name="get_weather"><atem:parameter name="city">"Tokyo"</atem:parameter>'
        '<atem:parameter name="days">1</atem:parameter></atem:invoke></atem:function_calls>'
    ),
    "pythonic": 'Checking.<|tool_call_start|>[get_weather(city="Paris", days=2), get_weather(city="Tokyo", days=1)]<|tool_call_end|>',
    "gemma4": (
        'Checking.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'
        '<|tool_call>call:get_weather{city:<|"|>Tokyo<|"|>,days:1}<tool_call|>'
    ),
    "function_gemma": (
        "Checking.<start_function_call>call:get_weather{city:<escape>Paris<escape>,days:2}<end_function_call>"
        "<start_function_call>call:get_weather{city:<escape>Tokyo<escape>,days:1}<end_function_call>"
    ),
    "harmony": (
        "<|channel|>analysis<|message|>The user wants weather.<|end|><|start|>assistant"
        "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant"
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 2}'
        "<|call|>"
    ),
}
OUTPUTS["laguna"] = OUTPUTS["glm47"]
EXPECTED = {name: [PARIS, TOKYO] for name in OUTPUTS} | {"harmony": [PARIS]}
# Formats whose arguments are JSON text: a grammar forces calls (the others get a 400).
FORCIBLE = {
    "json_tools",
    "glm47",
    "laguna",
    "longcat",
    "mistral",
    "kimi_k2",
    "kimi_k3",
    "harmony",
    "qwen3_coder",
    "minimax_m2",
}


def no_tokens(text: str) -> int | None:
    return None


def splitter(parser: str, single: bool = False) -> Splitter:
    model = make_model_info(tool_parser=parser)
    out = plan_tools(TOOLS, "auto", False if single else None, model, no_tokens).splitter()
    assert out is not None
    return out


def run(s: Splitter, text: str, size: int) -> Split:
    out = Split()
    for i in range(0, len(text), size):
        out += s.feed(text[i : i + size])
    return out + s.flush()


def test_every_installed_mlx_lm_parser_has_a_format():
    installed = tool_parsers.available()
    assert set(installed) == set(MLX_LM_FORMATS) and set(installed) <= set(OUTPUTS)
    for name in installed:
        module = tool_parsers.load(name)
        assert module is not None
        fmt = MLX_LM_FORMATS[name]
        assert (fmt.start, fmt.end) == (module.tool_call_start, module.tool_call_end), name


def test_the_parsers_load_without_mlx():
    code = (
        "import sys; from frontend import tool_parsers as t; [t.load(n) for n in t.available()]; "
        "assert 'mlx' not in sys.modules and 'mlx_lm' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("size", [1, 2, 5, 10_000])
@pytest.mark.parametrize("parser", sorted(OUTPUTS))
def test_calls_are_cut_out_of_streamed_text(parser, size):
    out = run(splitter(parser), OUTPUTS[parser], size)
    assert out.text == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == EXPECTED[parser]
    assert len({c.id for c in out.calls}) == len(out.calls)
    assert out.reasoning == ("The user wants weather." if parser == "harmony" else "")


@pytest.mark.parametrize("parser", sorted(OUTPUTS))
def test_a_single_call_ends_the_split(parser):
    s = splitter(parser, single=True)
    out = run(s, OUTPUTS[parser], 3)
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [PARIS]
    assert s.done and s.calls >= 1


@pytest.mark.parametrize("parser", ["json_tools", "qwen3_coder", "mistral", "kimi_k2"])
def test_text_that_is_not_a_call_stays_content(parser):
    fmt = TOOL_FORMATS[parser]
    broken = f"Hi {fmt.start}not a call{fmt.end}"
    out = run(splitter(parser), broken, 4)
    assert out.calls == [] and out.text == broken


def test_harmony_final_answer_and_reasoning():
    text = (
        "<|channel|>analysis<|message|>Think <|step|> twice.<|end|><|start|>assistant"
        "<|channel|>final<|message|>Paris is sunny.<|return|>"
    )
    for size in (1, 3, 1000):
        out = run(splitter("harmony"), text, size)
        assert (out.text, out.reasoning, out.calls) == ("Paris is sunny.", "Think <|step|> twice.", [])


def test_harmony_recipient_in_the_role_header_and_call_at_eos():
    # <|call|> is an EOS token: the detokenizer may never show it.
    text = "<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{}"
    out = run(splitter("harmony"), text, 2)
    assert [(c.name, c.arguments) for c in out.calls] == [("get_time", "{}")] and out.text == ""


def test_harmony_without_tools_still_splits_reasoning():
    model = make_model_info(tool_parser="harmony")
    s = plan_tools(None, None, None, model, no_tokens).splitter()
    assert s is not None
    out = run(s, "<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>ok", 1)
    assert (out.text, out.reasoning) == ("ok", "hm")


@pytest.mark.parametrize("parser", sorted(OUTPUTS))
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forcing_a_call_is_a_grammar_or_a_400(parser, choice):
    model = make_model_info(tool_parser=parser)
    if parser in FORCIBLE:
        plan = plan_tools(TOOLS, choice, None, model, no_tokens)
        assert plan.constraint is not None and plan.constraint.kind == "lark"
        return
    with pytest.raises(APIError) as info:
        plan_tools(TOOLS, choice, None, model, no_tokens)
    assert info.value.status == 400 and info.value.param == "tool_choice" and parser in info.value.message


def test_markers_that_are_tokens_are_tokens_in_the_grammar():
    ids = {"<|tool_calls_section_begin|>": 7, "<|tool_call_begin|>": 8, "<|tool_call_argument_begin|>": 9}
    plan = plan_tools(TOOLS, "required", None, make_model_info(tool_parser="kimi_k2"), ids.get)
    assert plan.constraint is not None
    grammar = plan.constraint.text
    assert all(f"<[{i}]>" in grammar for i in ids.values()) and '"<|tool_call_end|>"' in grammar
    assert set(plan.marker_ids) == set(ids.values())


def test_a_parser_newer_than_the_table_parses_by_its_own_markers(monkeypatch):
    monkeypatch.delitem(TOOL_FORMATS, "qwen3_coder")
    monkeypatch.delitem(MLX_LM_FORMATS, "qwen3_coder")
    out = run(splitter("qwen3_coder"), OUTPUTS["qwen3_coder"], 7)
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [PARIS, TOKYO]
    with pytest.raises(APIError) as info:
        plan_tools(TOOLS, "required", None, make_model_info(tool_parser="qwen3_coder"), no_tokens)
    assert info.value.status == 400


@pytest.mark.parametrize("parser", ["qwen3_coder", "minimax_m2"])
def test_arguments_written_as_text_need_plain_schemas(parser):
    model = make_model_info(tool_parser=parser)
    patterned = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}},
                "required": ["code"],
            },
        },
    }
    with pytest.raises(APIError) as info:
        plan_tools([patterned], "required", None, model, no_tokens)
    assert info.value.param == "tool_choice" and "'code'" in info.value.message
    plan = plan_tools([patterned], "auto", None, model, no_tokens)  # not forced: fine
    assert plan.constraint is None
