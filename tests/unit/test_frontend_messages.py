"""POST /v1/messages and /v1/messages/count_tokens (Anthropic Messages) with the fake engine."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import falcon.testing
import pytest

from frontend import pipeline
from frontend.anthropic_protocol import MessagesRequest
from frontend.app import create_app
from frontend.generation import FinishedChoice, Piece
from frontend.openapi import openapi_document
from frontend.resources.messages import MessagesStream, message
from frontend.tokenization import Tokenization
from frontend.tools import ToolCall
from tests.tool_template import TOOLS_CHATML_TEMPLATE
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, Script, write_tokenizer_dir
from tests.unit.test_frontend_tools import CALL, TOOL_MODEL
from tests.unit.test_openapi import validator

URL = "/v1/messages"
COUNT = "/v1/messages/count_tokens"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "cache_control": {"type": "ephemeral"},
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
EVENT_ORDER = ["message_start", "content_block_start", "ping"]


def named_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event; the name is always the data's type; no [DONE]."""
    out = []
    for block in text.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        out.append((name, data))
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenization:
    path = write_tokenizer_dir(tmp_path_factory.mktemp("tok"), chat_template=TOOLS_CHATML_TEMPLATE)
    return Tokenization.from_pretrained(path)


@pytest.fixture
def engine() -> FakeEngineClient:
    return FakeEngineClient(model_info=TOOL_MODEL)


def make_client(engine: FakeEngineClient, tok: Tokenization, **settings: Any) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings(**settings)))


@pytest.fixture
def client(engine, tok) -> falcon.testing.TestClient:
    return make_client(engine, tok)


def ids(tok: Tokenization, text: str) -> list[int]:
    return tok.hf.encode(text, add_special_tokens=False)


def post(client, path: str = URL, **body: Any) -> falcon.testing.Result:
    return client.simulate_post(path, json={"model": "claude-anything", "max_tokens": 400, "messages": USER, **body})


# ---------------------------------------------------------------- request mapping


def template_messages(**body: Any) -> list[dict[str, Any]]:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 1, **body}).template_messages()


def test_system_and_text_blocks_become_chat_messages():
    system = [
        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be kind."},
    ]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    assert template_messages(system=system, messages=messages) == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "Hi\nthere"},
    ]


def test_tool_turns_and_thinking_become_calls_tool_messages_and_reasoning():
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Need the weather.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no such city", "is_error": True},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    assert template_messages(messages=messages)[1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Need the weather.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such city"},
        {"role": "user", "content": "And tomorrow?"},
    ]


def test_sampling_stops_and_max_tokens_reach_the_engine(client, engine):
    body = {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop_sequences": ["END"], "metadata": {"user_id": "u"}}
    assert post(client, max_tokens=7, **body).status_code == 200
    [generate] = engine.submitted
    assert generate.max_tokens == 7
    assert (generate.sampling.temperature, generate.sampling.top_p, generate.sampling.top_k) == (0.5, 0.9, 40)


def test_fields_that_change_nothing_are_accepted(client, engine):
    extras = {
        "service_tier": "auto",
        "context_management": {"edits": []},
        "speed": "standard",
        "inference_geo": "us",
        "cache_control": {"type": "ephemeral"},
        "thinking": {"type": "disabled"},
        "output_config": {"effort": "low"},
    }
    result = client.simulate_post(
        URL,
        params={"beta": "true"},
        headers={"anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31"},
        json={"model": "m", "max_tokens": 5, "messages": USER, **extras},
    )
    assert result.status_code == 200, result.text


def test_thinking_reaches_the_templates_switch(tmp_path, engine):
    template = (
        "{% if enable_thinking %}THINK{% else %}PLAIN{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    tok = Tokenization.from_pretrained(write_tokenizer_dir(tmp_path, chat_template=template))
    tok.has_thinking = True  # as for a vocabulary with <think> and </think>
    client = make_client(engine, tok)
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}):
        assert post(client, thinking=thinking).status_code == 200
    on, off = (tok.decode(g.prompt_token_ids) for g in engine.submitted)
    assert on.startswith("THINK") and off.startswith("PLAIN")


def test_thinking_on_a_model_that_cannot_think_is_refused(client, engine):
    result = post(client, thinking={"type": "enabled", "budget_tokens": 1024})
    assert result.status_code == 400 and "thinking" in result.json["error"]["message"]
    assert result.json["type"] == "error" and not engine.submitted


def test_output_config_format_is_enforced_by_a_grammar(client, engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert post(client, output_config={"format": {"type": "json_schema", "schema": schema}}).status_code == 200
    assert engine.submitted[0].constraint.kind == "json_schema"


# ---------------------------------------------------------------- the message


def test_message_body(client, engine, tok):
    engine.script(Script(ids(tok, "It is sunny."), cached_prompt_tokens=4))
    result = post(client)
    assert result.status_code == 200, result.text
    body = result.json
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": "It is sunny."}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    prompt = len(engine.submitted[0].prompt_token_ids)
    assert body["usage"] == {
        "input_tokens": prompt - 4,
        "output_tokens": len(ids(tok, "It is sunny.")),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }


def test_stop_reasons(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world! STOP here.")), Script(ids(tok, "Hello world! Hello there")))
    stopped = post(client, stop_sequences=["STOP", "zzz"]).json
    assert stopped["content"][0]["text"] == "Hello world! "
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "STOP")
    cut = post(client, max_tokens=2).json
    assert (cut["stop_reason"], cut["stop_sequence"]) == ("max_tokens", None)


def test_tool_use_block(client, engine, tok):
    engine.script(Script(ids(tok, "Let me check.\n" + CALL)))
    body = post(client, tools=[WEATHER, TIME]).json
    text, call = body["content"]
    assert text == {"type": "text", "text": "Let me check."}
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_")
    assert (call["name"], call["input"]) == ("get_weather", {"city": "Paris"})
    assert body["stop_reason"] == "tool_use"
    assert "get_weather" in tok.decode(engine.submitted[0].prompt_token_ids)


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [({"type": "any"}, ["get_weather", "get_time"]), ({"type": "tool", "name": "get_weather"}, ["get_weather"])],
)
def test_forced_tool_choice_sends_a_grammar(client, engine, tok, tool_choice, expected):
    engine.script(Script(ids(tok, CALL)))
    body = post(client, tools=[WEATHER, TIME], tool_choice=tool_choice).json
    assert [block["type"] for block in body["content"]] == ["tool_use"]
    grammar = engine.submitted[0].constraint
    assert grammar.kind == "lark"
    assert all(f'"const": "{name}"' in grammar.text for name in expected)
    assert ("get_time" in grammar.text) == ("get_time" in expected)


def test_disable_parallel_tool_use_allows_one_call(client, engine, tok):
    engine.script(Script(ids(tok, CALL + "\n" + CALL + " and more")))
    body = post(client, tools=[WEATHER], tool_choice={"type": "auto", "disable_parallel_tool_use": True}).json
    assert [block["type"] for block in body["content"]] == ["tool_use"]


def test_tool_choice_none_leaves_the_answer_as_text(client, engine, tok):
    engine.script(Script(ids(tok, CALL)))
    body = post(client, tools=[WEATHER], tool_choice={"type": "none"}).json
    assert body["content"] == [{"type": "text", "text": CALL}] and body["stop_reason"] == "end_turn"


# ---------------------------------------------------------------- streaming


def test_stream_event_order_and_text(client, engine, tok):
    engine.script(Script(ids(tok, "It is sunny."), cached_prompt_tokens=3), Script(ids(tok, "It is sunny.")))
    events = named_events(post(client, stream=True).text)
    names = [name for name, _ in events]
    assert names[:3] == EVENT_ORDER
    assert names[3:] == ["content_block_delta"] * (len(names) - 6) + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "It is sunny." == post(client).json["content"][0]["text"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["cache_read_input_tokens"] == 3 and delta["usage"]["output_tokens"] == len(ids(tok, text))


def test_streamed_tool_use(client, engine, tok):
    engine.script(Script(ids(tok, "Checking.\n" + CALL + "\n" + CALL.replace("Paris", "Rome")), chunk=2))
    events = named_events(post(client, stream=True, tools=[WEATHER]).text)
    starts = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert [block["type"] for block in starts] == ["text", "tool_use", "tool_use"]
    assert starts[1]["input"] == {} and starts[1]["id"].startswith("toolu_")
    inputs = [
        json.loads(d["delta"]["partial_json"])
        for n, d in events
        if d.get("delta", {}).get("type") == "input_json_delta"
    ]
    assert inputs == [{"city": "Paris"}, {"city": "Rome"}]
    stops = [data["index"] for name, data in events if name == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_an_empty_answer_is_one_empty_text_block(client, engine):
    engine.script(Script([]), Script([]))
    assert post(client).json["content"] == [{"type": "text", "text": ""}]
    events = named_events(post(client, stream=True).text)
    assert [name for name, _ in events] == [*EVENT_ORDER, "content_block_stop", "message_delta", "message_stop"]


def test_thinking_pieces_stream_as_a_thinking_block_first():
    run = SimpleNamespace(stop_sequence=None)
    generation = SimpleNamespace(response_id="msg-abc", model_id="m", runs=[run])
    wire = MessagesStream(generation, prompt_tokens=5)  # type: ignore[arg-type]
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    events = [
        pipeline.Started(0),
        pipeline.Delta(0, Piece("", reasoning="Hmm, ")),
        pipeline.Delta(0, Piece("", reasoning="the weather.")),
        pipeline.Delta(0, Piece("Checking.", tool_calls=[call])),
        pipeline.Finished(0, "tool_calls"),
        pipeline.Completed(pipeline.TokenCounts(5, 9, 0)),
    ]
    raw = b"".join(pipeline.encode(iter(events), wire)).decode()
    got = [(n, d.get("content_block", d.get("delta", {})).get("type")) for n, d in named_events(raw)]
    assert got == [
        ("message_start", None),
        ("content_block_start", "thinking"),
        ("ping", None),
        ("content_block_delta", "thinking_delta"),
        ("content_block_delta", "thinking_delta"),
        ("content_block_stop", None),
        ("content_block_start", "text"),
        ("content_block_delta", "text_delta"),
        ("content_block_stop", None),
        ("content_block_start", "tool_use"),
        ("content_block_delta", "input_json_delta"),
        ("content_block_stop", None),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert named_events(raw)[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_failure_mid_stream_is_an_error_event(client, engine, tok):
    engine.script(Script(ids(tok, "It is sunny today."), fail_after=2))
    events = named_events(post(client, stream=True).text)
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "overloaded_error"
    assert "message_stop" not in [n for n, _ in events]
    assert engine.all_closed()


# ---------------------------------------------------------------- errors


def anthropic_error(result: falcon.testing.Result, status: int, kind: str) -> str:
    assert result.status_code == status, result.text
    assert result.json["type"] == "error" and result.json["error"]["type"] == kind
    assert set(result.json["error"]) == {"type", "message"}
    return result.json["error"]["message"]


def test_missing_max_tokens(client):
    result = client.simulate_post(URL, json={"model": "m", "messages": USER})
    assert "max_tokens" in anthropic_error(result, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
        ({"container": "c1"}, "container"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"thinking": {"type": "deep"}}, "thinking"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
            "tool_use",
        ),
        ({"temperature": 1.5}, "temperature"),
    ],
)
def test_what_cannot_be_done_is_a_400_naming_it(client, engine, body, named):
    assert named in anthropic_error(post(client, **body), 400, "invalid_request_error")
    assert engine.submitted == []


def test_unknown_route_and_method_in_anthropic_shape(client):
    anthropic_error(client.simulate_post("/v1/messages/batches"), 404, "not_found_error")
    anthropic_error(client.simulate_get(URL), 405, "invalid_request_error")


def test_queue_full_is_a_rate_limit_error(client, engine):
    engine.script(Script(finish_reason="overloaded", error="queue full"))
    anthropic_error(post(client), 429, "rate_limit_error")


def test_engine_down_is_overloaded(client, engine):
    engine.available = False
    anthropic_error(post(client), 503, "overloaded_error")


def test_x_api_key_and_bearer_are_both_accepted(engine, tok):
    client = make_client(engine, tok, api_keys=("sekrit",))
    assert post(client).status_code == 401
    anthropic_error(client.simulate_post(URL, headers={"x-api-key": "wrong"}, json={}), 401, "authentication_error")
    for headers in ({"x-api-key": "sekrit"}, {"Authorization": "Bearer sekrit"}):
        result = client.simulate_post(URL, headers=headers, json={"model": "m", "max_tokens": 3, "messages": USER})
        assert result.status_code == 200, result.text
    # Other routes keep OpenAI's error shape.
    assert client.simulate_get("/v1/models").json["error"]["code"] == "invalid_api_key"
    assert client.simulate_get("/v1/models", headers={"x-api-key": "sekrit"}).status_code == 200


# ---------------------------------------------------------------- count_tokens


def test_count_tokens_is_the_prompt_the_engine_gets(client, engine):
    body = {"system": "Be brief.", "tools": [WEATHER], "messages": USER}
    counted = client.simulate_post(COUNT, json={"model": "m", **body})
    assert counted.status_code == 200, counted.text
    assert post(client, **body).status_code == 200
    assert counted.json == {"input_tokens": len(engine.submitted[0].prompt_token_ids)}


def test_count_tokens_errors(client):
    anthropic_error(client.simulate_post(COUNT, json={"model": "m"}), 400, "invalid_request_error")
    bad = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}
    assert "image" in anthropic_error(client.simulate_post(COUNT, json=bad), 400, "invalid_request_error")


# ---------------------------------------------------------------- /openapi.json


def test_bodies_and_events_match_the_document(client, engine, tok):
    engine.script(Script(ids(tok, "Checking.\n" + CALL)), Script(ids(tok, "Checking.\n" + CALL), chunk=3))
    validator("Message").validate(post(client, tools=[WEATHER]).json)
    for _, data in named_events(post(client, tools=[WEATHER], stream=True).text):
        validator("MessageStreamEvent").validate(data)
    validator("CountTokensResponse").validate(client.simulate_post(COUNT, json={"model": "m", "messages": USER}).json)
    validator("AnthropicError").validate(client.simulate_post(URL, json={}).json)


# ---------------------------------------------------------------- prefill and tool errors


def test_a_last_assistant_message_is_the_start_of_the_answer(client, engine, tok):
    engine.script(Script(ids(tok, " Paris.")))
    messages = [*USER, {"role": "assistant", "content": "The answer is"}]
    body = post(client, messages=messages).json
    assert body["content"] == [{"type": "text", "text": " Paris."}]  # the continuation, its space kept
    prompt = engine.submitted[0].prompt_token_ids
    assert prompt == tok.render_chat(USER) + ids(tok, "The answer is")
    counted = client.simulate_post(COUNT, json={"model": "m", "messages": messages}).json
    assert counted == {"input_tokens": len(prompt)}


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param"),
    [
        ([{"name": "bad name", "input_schema": {}}], None, "tools[0].name"),
        ([{"name": "f", "input_schema": "nope"}], None, "tools[0].input_schema"),
        ([TIME], {"type": "tool", "name": "nope"}, "tool_choice"),
    ],
)
def test_tool_errors_name_anthropics_fields(client, tools, tool_choice, param):
    body = {"tools": tools} if tool_choice is None else {"tools": tools, "tool_choice": tool_choice}
    message = anthropic_error(post(client, **body), 400, "invalid_request_error")
    assert message.startswith(param) and ".function" not in message


def test_the_stream_is_declared_as_named_events():
    doc = openapi_document()
    stream = doc["paths"][URL]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert stream["required"] == ["event", "data"]
    assert stream["properties"]["data"]["contentSchema"]["anyOf"][0] == {
        "$ref": "#/components/schemas/MessageStreamEvent"
    }
    assert "[DONE]" not in json.dumps(stream)


@pytest.mark.parametrize(
    "body",
    [
        {"thinking": {"type": ["enabled"]}},
        {"tool_choice": {"type": {}}},
        {"messages": [{"role": "user", "content": [{"type": ["text"], "text": "x"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 3}]}]},
        {"messages": [{"role": "user", "content": [{"type": "redacted_thinking", "data": "x"}]}]},
        {"messages": [{"role": "user", "content": []}]},
        {"system": "only a system prompt", "messages": [{"role": "user", "content": []}]},
    ],
)
def test_odd_shapes_are_400s(client, engine, body):
    anthropic_error(post(client, **body), 400, "invalid_request_error")
    assert engine.submitted == []


def test_reasoning_is_a_thinking_block_before_the_answer():
    generation = SimpleNamespace(response_id="msg-abc", model_id="m", runs=[SimpleNamespace(stop_sequence=None)])
    choice = FinishedChoice(0, "Paris.", "stop", reasoning="The capital, surely.")
    body = message(generation, pipeline.Outcome([choice], pipeline.TokenCounts(9, 4, 2)))  # type: ignore[arg-type]
    assert json.loads(body.dump()) == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [
            {"type": "thinking", "thinking": "The capital, surely.", "signature": ""},
            {"type": "text", "text": "Paris."},
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 7,
            "output_tokens": 4,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2,
        },
    }


def test_logit_bias_extension_reaches_the_sampler(client, engine):
    """mlx-server's extension, as in chat: bench.serving bans EOS with it."""
    assert post(client, logit_bias={"7": -100}).status_code == 200
    assert engine.submitted[0].sampling.logit_bias == {7: -100.0}
    bad = post(client, logit_bias={"x": 1})
    assert bad.status_code == 400 and "logit_bias" in bad.json["error"]["message"]
