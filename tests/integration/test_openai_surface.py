"""The OpenAI request surface of issue 4 on the real server (tiny model), with the openai client."""

from __future__ import annotations

import json
import math
from typing import Literal

import httpx
import jsonschema
import mlx.core as mx
import openai
import pydantic
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from tests.integration.server import ServerProcess
from tests.model_factory import build_tiny_model
from tests.openai_schema import validate
from tests.sse import sse_chunks
from tests.tool_template import TOOLS_CHATML_TEMPLATE

MESSAGES = [{"role": "user", "content": "Tell me about Paris."}]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load(str(tiny_model_dir))


def _greedy_logprobs(model, prompt: list[int], n: int) -> list[tuple[int, mx.array]]:
    out = []
    for (token, logprobs), _ in zip(generate_step(mx.array(prompt), model), range(n)):
        out.append((int(token), logprobs))
    return out


# ---------------------------------------------------------------- 1. logprobs


def test_chat_logprobs_match_the_model(client, reference):
    model, tokenizer = reference
    chat = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    validate(chat.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    expected = _greedy_logprobs(model, prompt, len(content))
    for entry, (token, row) in zip(content, expected):
        text = tokenizer.decode([token])
        if "\ufffd" not in text:
            assert entry.token == text and bytes(entry.bytes) == text.encode()
        assert math.isclose(entry.logprob, row[token].item(), abs_tol=1e-3)
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the best token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace").lstrip() == (
        chat.choices[0].message.content.lstrip()
    )


def test_chat_logprobs_streamed(client, no_eos):
    kwargs = dict(model="x", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs, logit_bias=no_eos)
    streamed = []
    for chunk in client.chat.completions.create(**kwargs, logit_bias=no_eos, stream=True):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    assert len(streamed) == 10


def test_completion_logprobs(client, base, no_eos):
    out = client.completions.create(model="x", prompt="Once upon a time", max_tokens=6, logprobs=3, logit_bias=no_eos)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2, "logprobs": 1}, timeout=60)
    validate(r.json(), "CreateCompletionResponse")


def test_logprobs_errors(base):
    r = httpx.post(
        f"{base}/v1/chat/completions", json={"messages": MESSAGES, "logprobs": True, "top_logprobs": 30}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    validate(r.json(), "ErrorResponse")


# ---------------------------------------------------------------- 2. structured output

# Bounded strings/numbers/arrays: the random-weight model must finish inside max_tokens.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "member"],
    "additionalProperties": False,
}


class Point(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    x: int = pydantic.Field(ge=-5, le=5)
    y: int = pydantic.Field(ge=-5, le=5)
    label: Literal["origin", "other"]


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_validates(client, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    chat = client.chat.completions.create(
        model="x", messages=MESSAGES, response_format=fmt, max_tokens=300, temperature=temperature, seed=3, n=3
    )
    validate(chat.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)


def test_openai_parse_with_a_pydantic_model(client):
    parsed = client.chat.completions.parse(model="x", messages=MESSAGES, response_format=Point, max_tokens=100)
    point = parsed.choices[0].message.parsed
    assert isinstance(point, Point) and -5 <= point.x <= 5


def test_json_schema_streamed(base):
    payload = {
        "messages": MESSAGES,
        "max_tokens": 300,
        "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}},
    }
    text, finish = "", None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=120) as r:
        for chunk in sse_chunks(r.iter_text()):
            validate(chunk, "CreateChatCompletionStreamResponse")
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
                finish = chunk["choices"][0]["finish_reason"] or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_json_object_parses_as_an_object(client):
    chat = client.chat.completions.create(
        model="x", messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=400, temperature=0
    )
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content), dict)


def test_json_schema_cut_by_max_tokens_is_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    chat = client.chat.completions.create(model="x", messages=MESSAGES, response_format=fmt, max_tokens=4)
    assert chat.choices[0].finish_reason == "length"
    assert chat.choices[0].message.content.startswith('{"')


def test_completions_with_json_schema(base):
    payload = {
        "prompt": "JSON:",
        "max_tokens": 200,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}},
    }
    body = httpx.post(f"{base}/v1/completions", json=payload, timeout=120).json()
    validate(body, "CreateCompletionResponse")
    jsonschema.validate(json.loads(body["choices"][0]["text"]), PERSON_SCHEMA)


def test_bad_schema_is_400(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=MESSAGES, response_format=fmt)
    assert info.value.body["param"] == "response_format.json_schema.schema"


# ---------------------------------------------------------------- 3. tools

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
TOOL_MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, server_logs):
    # The markers as added tokens, as Qwen 2.5/3 and Hermes tokenizers have them.
    directory = tmp_path_factory.mktemp("tool-model")
    model_dir = build_tiny_model(directory, chat_template=TOOLS_CHATML_TEMPLATE, tool_markers="added")
    with ServerProcess(model_dir, server_logs) as server:
        yield server


@pytest.fixture(scope="module")
def tool_client(tool_server):
    return openai.OpenAI(base_url=f"{tool_server.base_url}/v1", api_key="unused", max_retries=0)


def _check_call(call, tools=TOOLS):
    [tool] = [t for t in tools if t["function"]["name"] == call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert call.id.startswith("call_") and call.type == "function"


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_named_tool_choice_forces_a_valid_call(tool_client, temperature):
    chat = tool_client.chat.completions.create(
        model="x",
        messages=TOOL_MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
        temperature=temperature,
        seed=5,
        n=2,
    )
    validate(chat.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    for choice in chat.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        _check_call(call)


def test_required_tool_choice_streamed(tool_client):
    with tool_client.chat.completions.stream(
        model="x",
        messages=TOOL_MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
        temperature=0,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    _check_call(call)


def test_required_with_parallel_calls(tool_client):
    # Any number of calls; a random model may go on until max_tokens cuts the last one.
    chat = tool_client.chat.completions.create(
        model="x", messages=TOOL_MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=1.0, seed=1
    )
    choice = chat.choices[0]
    assert choice.message.tool_calls and choice.finish_reason in ("tool_calls", "length")
    for call in choice.message.tool_calls:
        _check_call(call)


def test_auto_and_none_with_tools(tool_server, tool_client, no_eos):
    # The random model almost never writes a call by itself: the answer is text.
    auto = tool_client.chat.completions.create(
        model="x", messages=TOOL_MESSAGES, tools=TOOLS, max_tokens=10, temperature=0, logit_bias=no_eos
    )
    assert auto.choices[0].finish_reason in ("length", "tool_calls")
    none = tool_client.chat.completions.create(
        model="x", messages=TOOL_MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=10, logit_bias=no_eos
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "length"


def test_tool_round_trip_conversation(tool_client):
    first = tool_client.chat.completions.create(
        model="x", messages=TOOL_MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *TOOL_MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = tool_client.chat.completions.create(model="x", messages=messages, tools=TOOLS, max_tokens=5)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_refused_for_a_model_without_tool_calling(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=TOOL_MESSAGES, tools=TOOLS, tool_choice="required")
    assert info.value.body["param"] == "tools" and info.value.body["code"] == "unsupported_parameter"


# ---------------------------------------------------------------- a real model


def test_real_model_structured_answer_and_logprobs(smollm2_dir, server_logs):
    """SmolLM2-135M-Instruct: the schema shapes a real, correct answer."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "is_capital": {"type": "boolean"}},
        "required": ["city", "country", "is_capital"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "Give me the capital of France as JSON with city, country and is_capital."}]
    with ServerProcess(smollm2_dir, server_logs, workers=1) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model="x",
            messages=messages,
            max_tokens=60,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
        )
    choice = chat.choices[0]
    assert choice.finish_reason == "stop"
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, schema)
    assert answer["city"] == "Paris" and answer["is_capital"] is True
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in tokens)
