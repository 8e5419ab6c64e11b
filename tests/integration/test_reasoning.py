"""Reasoning on the real server: a tiny thinking model (<think>/</think> added tokens) whose
template opens <think> in the generation prompt unless enable_thinking is false."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.integration.server import ServerProcess
from tests.model_factory import build_tiny_model
from tests.openai_schema import validate
from tests.sse import sse_chunks
from tests.thinking_template import TOOLS_THINKING_TEMPLATE

MESSAGES = [{"role": "user", "content": "What time is it?"}]
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory, server_logs):
    directory = tmp_path_factory.mktemp("thinking-model")
    model_dir = build_tiny_model(directory, chat_template=TOOLS_THINKING_TEMPLATE, tool_markers="added", thinking=True)
    with ServerProcess(model_dir, server_logs) as server:
        yield server


@pytest.fixture(scope="module")
def thinking_client(thinking_server):
    return openai.OpenAI(base_url=f"{thinking_server.base_url}/v1", api_key="unused", max_retries=0)


def _both(base: str, body: dict) -> tuple[dict, list[dict]]:
    """The non-streamed response and the streamed chunks of the same request."""
    plain = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert plain.status_code == 200, plain.text
    validate(plain.json(), "CreateChatCompletionResponse")
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as streamed:
        chunks = list(sse_chunks(streamed.iter_text()))
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return plain.json(), chunks


def _joined(chunks: list[dict], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def test_output_starts_inside_reasoning(thinking_server, no_eos):
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "logit_bias": no_eos}
    plain, chunks = _both(thinking_server.base_url, body)
    message = plain["choices"][0]["message"]
    assert message["reasoning_content"] and message["reasoning"] == message["reasoning_content"]
    assert _joined(chunks, "reasoning_content") == message["reasoning_content"]
    assert _joined(chunks, "content") == message["content"]
    assert plain["usage"]["completion_tokens"] == 16  # reasoning tokens count
    # The random model does not write </think>: every token is reasoning.
    assert message["content"] == ""
    assert plain["usage"]["completion_tokens_details"] == {"reasoning_tokens": 16}
    assert plain["choices"][0]["finish_reason"] == "length"


def test_reasoning_effort_none_answers_without_reasoning(thinking_server, no_eos):
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logit_bias": no_eos, "reasoning_effort": "none"}
    plain, chunks = _both(thinking_server.base_url, body)
    message = plain["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"]
    assert plain["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert _joined(chunks, "content") == message["content"] and not _joined(chunks, "reasoning_content")


def test_a_forced_tool_call_inside_the_opened_reasoning_is_a_call(thinking_client):
    chat = thinking_client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        tools=[TIME_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
    )
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    assert choice.message.content is None
    assert chat.usage.completion_tokens_details.reasoning_tokens == 0  # the call's start marker ended it


def test_tokenize_counts_the_prompt_the_chat_sends(thinking_server):
    base = thinking_server.base_url
    counted = httpx.post(f"{base}/tokenize", json={"messages": MESSAGES}, timeout=30).json()
    chat = httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}, timeout=30).json()
    assert counted["count"] == chat["usage"]["prompt_tokens"]
    text = httpx.post(f"{base}/detokenize", json={"tokens": counted["tokens"]}, timeout=30).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n<think>\n")


def test_anthropic_thinking_block_on_a_thinking_model(thinking_server, no_eos):
    """Anthropic's SDK: the reasoning is a thinking block before the text, streamed as
    thinking_delta; thinking disabled leaves no thinking block."""
    client = anthropic.Anthropic(base_url=thinking_server.base_url, api_key="unused", max_retries=0)
    request = {
        "model": "x",
        "max_tokens": 12,
        "messages": MESSAGES,
        # SDK 2.x no longer lists temperature; agent clients still send it.
        "extra_body": {"logit_bias": no_eos, "temperature": 0},
    }
    message = client.messages.create(**request, thinking={"type": "enabled", "budget_tokens": 1024})
    assert message.content[0].type == "thinking" and message.content[0].thinking
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 12
    with client.messages.stream(**request, thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].thinking == message.content[0].thinking
    off = client.messages.create(**request, thinking={"type": "disabled"})
    assert [block.type for block in off.content] == ["text"] and off.content[0].text


def test_responses_reasoning_item_on_a_thinking_model(thinking_client, no_eos):
    """OpenAI's Responses: the reasoning is a reasoning item (incomplete, cut by max_output_tokens),
    the same streamed; reasoning.effort none gives a message only."""
    request = {"model": "x", "input": "What time is it?", "max_output_tokens": 12, "temperature": 0}
    extra = {"extra_body": {"logit_bias": no_eos}}
    response = thinking_client.responses.create(**request, **extra)
    assert response.status == "incomplete" and response.output[0].type == "reasoning"
    reasoning = "".join(part.text for part in response.output[0].content or [])
    assert reasoning and response.usage.output_tokens_details.reasoning_tokens == 12
    events = list(thinking_client.responses.create(**request, **extra, stream=True))
    deltas = [event.delta for event in events if event.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == reasoning
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.usage.output_tokens_details.reasoning_tokens == 12
    off = thinking_client.responses.create(**request, **extra, reasoning={"effort": "none"})
    assert [item.type for item in off.output] == ["message"] and off.output_text
    assert off.usage.output_tokens_details.reasoning_tokens == 0
