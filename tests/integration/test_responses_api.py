"""POST /v1/responses through the official openai SDK against a real server (tiny model, Qwen-style tools)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.integration.server import ServerProcess
from tests.model_factory import build_tiny_model
from tests.openai_schema import validate
from tests.tool_template import TOOLS_CHATML_TEMPLATE

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
TIME = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    "strict": True,
}
TOOLS = [WEATHER, TIME]
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_logs):
    # One server for the module: the tiny model with tool markers as added tokens (as Qwen's).
    model_dir = build_tiny_model(
        tmp_path_factory.mktemp("responses-model"), chat_template=TOOLS_CHATML_TEMPLATE, tool_markers="added"
    )
    with ServerProcess(model_dir, server_logs) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _valid(response) -> None:
    validate(response.model_dump(mode="json", exclude_unset=True, by_alias=True), "Response")


def _check_call(item) -> None:
    [tool] = [t for t in TOOLS if t["name"] == item.name]
    jsonschema.validate(json.loads(item.arguments), tool["parameters"])
    assert item.type == "function_call" and item.call_id.startswith("call_")


def test_plain_response(client):
    response = client.responses.create(model="x", input="Hello!", instructions="Be brief.", max_output_tokens=40)
    _valid(response)
    assert response.id.startswith("resp_") and response.status in ("completed", "incomplete")
    assert response.output[-1].type == "message"
    assert response.output_text == response.output[-1].content[0].text
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 40


def test_streamed_text_equals_non_streamed_at_temperature_0(client):
    kwargs = {"model": "x", "input": "Tell me a story.", "max_output_tokens": 30, "temperature": 0}
    plain = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    final = events[-1].response  # get_final_response() wants response.completed; a cut ends in incomplete
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == plain.output_text == final.output_text
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for event in events:
        validate(event.model_dump(mode="json", exclude_unset=True, by_alias=True), "ResponseStreamEvent")
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_logprobs_streamed_and_not_agree_with_the_text(client):
    kwargs = {
        "model": "x",
        "input": "Tell me a story.",
        "max_output_tokens": 12,
        "temperature": 0,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
    }
    plain = client.responses.create(**kwargs)
    _valid(plain)
    [part] = plain.output[-1].content
    assert part.logprobs and all(len(entry.top_logprobs) == 2 for entry in part.logprobs)
    assert len(part.logprobs) == plain.usage.output_tokens  # one per token, none of them reasoning
    # Greedy: each token is its position's most likely one.
    assert all(entry.logprob == max(t.logprob for t in entry.top_logprobs) for entry in part.logprobs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    deltas = [entry for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    assert [(e.token, e.logprob) for e in deltas] == [(e.token, e.logprob) for e in part.logprobs]


def test_stream_true_yields_events(client):
    events = list(client.responses.create(model="x", input="Hi", max_output_tokens=5, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")


def test_max_output_tokens_makes_it_incomplete(client):
    # Greedy on a fixed model: the same 3 tokens every run, none of them EOS.
    response = client.responses.create(model="x", input="Count to one hundred.", max_output_tokens=3, temperature=0)
    _valid(response)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_tool_call(client, tool_choice):
    response = client.responses.create(
        model="x",
        input=QUESTION,
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_output_tokens=200,
        temperature=0,
    )
    _valid(response)
    [call] = [item for item in response.output if item.type == "function_call"]
    _check_call(call)
    if isinstance(tool_choice, dict):
        assert call.name == "get_weather"


def test_forced_tool_call_streamed(client):
    with client.responses.stream(
        model="x",
        input=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    [call] = [item for item in final.output if item.type == "function_call"]
    _check_call(call)
    assert [d.arguments for d in done] == [call.arguments]


def test_multi_turn_with_function_call_output(client):
    first = client.responses.create(
        model="x",
        input=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
        temperature=0,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    items = [
        {"role": "user", "content": QUESTION},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
    ]
    second = client.responses.create(model="x", input=items, tools=TOOLS, max_output_tokens=5, store=False)
    _valid(second)
    assert second.status in ("completed", "incomplete")


def test_json_schema_text_format(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model="x",
        input=QUESTION,
        max_output_tokens=200,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}},
    )
    _valid(response)
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ],
)
def test_what_cannot_be_done_is_a_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="x", input="Hi", **body)
    assert info.value.body["param"] == param and info.value.body["code"] == "unsupported_parameter"
