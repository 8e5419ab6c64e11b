"""The Anthropic Messages API on the real server (tiny model with a tool template), with the official anthropic SDK."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from tests.integration.server import ServerProcess
from tests.model_factory import build_tiny_model
from tests.tool_template import TOOLS_CHATML_TEMPLATE

API_KEY = "messages-test-key"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
TIME = {
    "name": "get_time",
    "description": "The local time",
    "input_schema": {"type": "object", "properties": {}, "additionalProperties": False},
}
TOOLS = [WEATHER, TIME]


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_logs):
    # The markers as added tokens, as Qwen 2.5/3 and Hermes tokenizers have them.
    model_dir = build_tiny_model(
        tmp_path_factory.mktemp("tool-model"), chat_template=TOOLS_CHATML_TEMPLATE, tool_markers="added"
    )
    with ServerProcess(model_dir, server_logs, "--api-key", API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def claude(server):
    """The SDK as agents configure it: base_url without /v1, the key in x-api-key."""
    return anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def _check_tool_use(block, tools=TOOLS):
    [tool] = [t for t in tools if t["name"] == block.name]
    jsonschema.validate(block.input, tool["input_schema"])
    assert block.type == "tool_use" and block.id.startswith("toolu_")


def test_plain_message(claude):
    message = claude.messages.create(
        model="claude-sonnet-4-5", max_tokens=12, system="Answer briefly.", messages=USER, extra_body={"temperature": 0}
    )
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= message.usage.output_tokens <= 12 and message.usage.input_tokens > 0
    assert message.usage.cache_creation_input_tokens == 0


def test_streamed_text_equals_the_message_at_temperature_0(claude):
    # SDK 2.x no longer lists the sampling fields; older SDKs and agent CLIs still send them.
    kwargs = dict(model="x", max_tokens=16, messages=USER, extra_body={"temperature": 0}, stop_sequences=["zz"])
    message = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == message.content[0].text
    assert final.stop_reason == message.stop_reason
    assert final.usage.output_tokens == message.usage.output_tokens
    # The second time the prompt comes from the prefix cache; input + cached is the whole prompt.
    whole = message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == whole


def test_raw_event_order(server):
    # The SDK skips pings: read the wire itself.
    body = {"model": "x", "max_tokens": 5, "messages": USER, "stream": True}
    result = httpx.post(f"{server.base_url}/v1/messages", headers={"x-api-key": API_KEY}, json=body, timeout=60)
    assert result.headers["content-type"].startswith("text/event-stream")
    events = [block.split("\n") for block in result.text.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert all(json.loads(lines[1].removeprefix("data: "))["type"] == name for name, lines in zip(names, events))
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) <= {"content_block_delta"}


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}], ids=["any", "tool"])
def test_forced_tool_use(claude, tool_choice):
    message = claude.messages.create(
        model="x",
        max_tokens=300,
        messages=USER,
        tools=TOOLS,
        tool_choice={**tool_choice, "disable_parallel_tool_use": True},
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "tool_use", message
    [call] = message.content
    _check_tool_use(call)
    if tool_choice["type"] == "tool":
        assert call.name == "get_weather"


def test_any_with_parallel_calls(claude):
    # Any number of calls; a random model may go on until max_tokens cuts the last one.
    message = claude.messages.create(
        model="x",
        max_tokens=300,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "any"},
        extra_body={"temperature": 1.0},
    )
    calls = [block for block in message.content if block.type == "tool_use"]
    assert calls and message.stop_reason in ("tool_use", "max_tokens")
    for call in calls:
        _check_tool_use(call)


def test_forced_tool_use_streamed(claude):
    with claude.messages.stream(
        model="x",
        max_tokens=300,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        extra_body={"temperature": 0},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [call] = final.content
    assert call.name == "get_weather"
    _check_tool_use(call)


def test_multi_turn_with_tool_result(claude):
    first = claude.messages.create(
        model="x",
        max_tokens=300,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "any"},
        extra_body={"temperature": 0},
    )
    call = next(block for block in first.content if block.type == "tool_use")
    messages = [
        *USER,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"},
                {"type": "text", "text": "Thanks!", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ]
    second = claude.messages.create(model="x", max_tokens=5, messages=messages, tools=TOOLS)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    counted = claude.messages.count_tokens(model="x", messages=messages, tools=TOOLS)
    assert counted.input_tokens == second.usage.input_tokens + second.usage.cache_read_input_tokens


def test_count_tokens(claude):
    counted = claude.messages.count_tokens(model="x", system="Answer briefly.", messages=USER)
    message = claude.messages.create(model="x", max_tokens=1, system="Answer briefly.", messages=USER)
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens > 0


def test_missing_max_tokens_is_a_400_in_anthropics_shape(server):
    result = httpx.post(
        f"{server.base_url}/v1/messages?beta=true",
        headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
        json={"model": "x", "messages": USER},
    )
    assert result.status_code == 400
    body = result.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_errors_through_the_sdk(server, claude):
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(
            model="x", max_tokens=5, messages=USER
        )
    assert bad_key.value.body["error"]["type"] == "authentication_error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="x", max_tokens=5, messages=[{"role": "user", "content": [image]}])
    assert "image" in refused.value.body["error"]["message"]
