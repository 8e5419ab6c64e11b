"""POST /v1/responses against a fake engine: mapping in, the response object and its stream events out,
each body and event validated against OpenAI's OpenAPI document."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import falcon.testing
import pytest

from frontend import pipeline
from frontend.app import create_app
from frontend.generation import FinishedChoice, Piece, TokenLogprob
from frontend.reasoning import effort_switch
from frontend.resources.responses import ResponseBuilder, ResponsesStream
from frontend.responses_protocol import ResponsesRequest
from frontend.tokenization import Tokenization
from frontend.tools import ToolCall
from tests.openai_schema import validate
from tests.tool_template import TOOLS_CHATML_TEMPLATE
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import (
    FakeEngineClient,
    Script,
    fake_logprob,
    fake_top_logprobs,
    make_model_info,
    write_tokenizer_dir,
)

URL = "/v1/responses"
TOOL_MODEL = make_model_info(
    context_length=4096, tool_parser="json_tools", tool_call_start="<tool_call>", tool_call_end="</tool_call>"
)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# Each event type and the component of OpenAI's document that defines it.
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "error": "ResponseErrorEvent",
}


def ids(tok: Tokenization, text: str) -> list[int]:
    return tok.hf.encode(text, add_special_tokens=False)


def named_events(raw: str | bytes) -> list[dict[str, Any]]:
    """Every event's data, checked: named after its type, valid, numbered 0, 1, 2, ...; no [DONE]."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    assert text.endswith("\n\n") and "[DONE]" not in text
    events = []
    for block in text.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {data['type']}"
        validate(data, EVENT_SCHEMAS[data["type"]])
        validate(data, "ResponseStreamEvent")
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def post(client: falcon.testing.TestClient, **body: Any) -> falcon.testing.Result:
    return client.simulate_post(URL, json={"model": "anything", "input": "Hello world!", **body})


# ---------------------------------------------------------------- plain text


def test_plain_response(client, engine, tok):
    engine.script(Script(ids(tok, "Paris is the capital of France."), cached_prompt_tokens=3))
    result = post(client, instructions="Be brief.", max_output_tokens=50, metadata={"k": "v"}, store=True)
    assert result.status_code == 200, result.text
    body = result.json
    validate(body, "Response")
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert body["status"] == "completed" and body["incomplete_details"] is None and body["error"] is None
    assert body["model"] == "tiny-test-model"
    [message] = body["output"]
    assert message["type"] == "message" and message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"] == [
        {"type": "output_text", "text": "Paris is the capital of France.", "annotations": [], "logprobs": []}
    ]
    [request] = engine.submitted
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    assert request.prompt_token_ids == tok.render_chat(messages)
    assert request.max_tokens == 50
    usage = body["usage"]
    assert usage["input_tokens"] == len(request.prompt_token_ids)
    assert usage["output_tokens"] == len(ids(tok, "Paris is the capital of France."))
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"]["cached_tokens"] == 3
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert (body["instructions"], body["max_output_tokens"], body["metadata"]) == ("Be brief.", 50, {"k": "v"})
    assert engine.all_closed()


def test_sampling_fields_reach_the_engine(client, engine):
    post(client, temperature=0.5, top_p=0.9, logit_bias={"2": -100})
    sampling = engine.submitted[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.logit_bias) == (0.5, 0.9, {2: -100.0})


def test_max_output_tokens_makes_it_incomplete(client, engine, tok):
    engine.script(Script(ids(tok, "The quick brown fox jumps over the lazy dog.")))
    body = post(client, max_output_tokens=3).json
    validate(body, "Response")
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"
    assert body["usage"]["output_tokens"] == 3


def test_streamed_events_in_order(client, engine, tok):
    engine.script(Script(ids(tok, "Hello there")))
    result = post(client, stream=True)
    assert result.headers["content-type"].startswith("text/event-stream")
    events = named_events(result.text)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello there"
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in events[3:8])
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"]
    assert final["output"] == [events[-2]["item"]]
    assert final["output"][0]["content"][0]["text"] == "Hello there"
    assert final["usage"]["output_tokens"] == 2
    assert engine.all_closed()


# ---------------------------------------------------------------- logprobs


def expected_logprobs(tok: Tokenization, token_ids: list[int], top: int, start: int = 0) -> list[dict[str, Any]]:
    """output_text.logprobs as chat's logprobs.content: one entry per token, the fake engine's numbers."""
    entries = []
    for i, token_id in enumerate(token_ids, start):
        alternatives = [
            {"token": tok.token_entry(t)[0], "logprob": v, "bytes": list(tok.token_entry(t)[1])}
            for t, v in fake_top_logprobs(token_id, i, top)
        ]
        token, raw = tok.token_entry(token_id)
        entries.append({"token": token, "logprob": fake_logprob(i), "bytes": list(raw), "top_logprobs": alternatives})
    return entries


@pytest.mark.parametrize(
    ("fields", "top"),
    [
        ({"include": ["message.output_text.logprobs"]}, 0),
        ({"include": ["message.output_text.logprobs"], "top_logprobs": 2}, 2),
        ({"top_logprobs": 3}, 3),
    ],
)
def test_logprobs_come_with_the_output_text(client, engine, tok, fields, top):
    token_ids = ids(tok, "Paris is the capital.")
    engine.script(Script(token_ids))
    body = post(client, **fields).json
    validate(body, "Response")
    [request] = engine.submitted
    assert request.logprobs == top
    [part] = body["output"][0]["content"]
    assert part["text"] == "Paris is the capital."
    assert part["logprobs"] == expected_logprobs(tok, token_ids, top)
    assert b"".join(bytes(e["bytes"]) for e in part["logprobs"]) == b"Paris is the capital."


def test_no_logprobs_unless_asked(client, engine, tok):
    engine.script(Script(ids(tok, "Paris.")))
    body = post(client, include=["reasoning.encrypted_content"], top_logprobs=0).json
    assert engine.submitted[0].logprobs is None
    assert body["output"][0]["content"][0]["logprobs"] == []


def test_streamed_logprobs_come_with_each_delta_and_whole_at_the_end(client, engine, tok):
    token_ids = ids(tok, "Hello there, world")
    engine.script(Script(token_ids, chunk=2))
    events = named_events(post(client, stream=True, include=["message.output_text.logprobs"], top_logprobs=1).text)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1 and sum(len(e["logprobs"]) for e in deltas) == len(token_ids)
    streamed = [entry for e in deltas for entry in e["logprobs"]]
    assert streamed == expected_logprobs(tok, token_ids, 1)
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    [part_done] = [e for e in events if e["type"] == "response.content_part.done"]
    assert done["logprobs"] == part_done["part"]["logprobs"] == streamed
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == streamed


def test_streamed_cut_is_incomplete(client, engine, tok):
    engine.script(Script(ids(tok, "The quick brown fox jumps over the lazy dog.")))
    events = named_events(post(client, stream=True, max_output_tokens=2).text)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_an_empty_answer_is_an_empty_message(client, engine):
    engine.script(Script([]))
    events = named_events(post(client, stream=True).text)
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""
    assert post(client).json["output"][0]["content"][0]["text"] == ""


def test_failure_mid_stream_is_an_error_event_then_response_failed(client, engine, tok):
    engine.script(Script(ids(tok, "Hi there, how are you"), fail_after=2))
    events = named_events(post(client, stream=True).text)
    assert types(events)[-2:] == ["error", "response.failed"]
    assert "engine is unavailable" in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert engine.all_closed()


# ---------------------------------------------------------------- reasoning and calls (stream adapter on its own)


def _builder(tok: Tokenization, **body: Any) -> ResponseBuilder:
    generation = pipeline.Generation("resp-abc", 1_700_000_000, "tiny-test-model", [], [5])
    return ResponseBuilder(generation, ResponsesRequest.model_validate({"input": "hi", **body}), tok)


def _encode(stream: ResponsesStream, events: list[pipeline.Event]) -> list[dict[str, Any]]:
    return named_events(b"".join(pipeline.encode(iter(events), stream)))


def test_reasoning_then_answer_then_call_are_three_items(tok):
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    events = _encode(
        ResponsesStream(_builder(tok, reasoning={"effort": "high"})),
        [
            pipeline.Started(0),
            pipeline.Delta(0, Piece("", reasoning="Let me")),
            pipeline.Delta(0, Piece("", reasoning=" think.")),
            pipeline.Delta(0, Piece("Checking.")),
            pipeline.Delta(0, Piece("", tool_calls=[call])),
            pipeline.Finished(0, "tool_calls"),
            pipeline.Completed(pipeline.TokenCounts(5, 9, 0)),
        ],
    )
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["reasoning", "message", "function_call"]
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert reasoning == "Let me think."
    args = [e for e in events if e["type"].startswith("response.function_call_arguments")]
    assert [a["type"] for a in args] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    ]
    assert args[1]["arguments"] == '{"city": "Paris"}' and args[1]["name"] == "get_weather"
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    validate(final, "Response")
    rs, msg, fc = final["output"]
    assert rs["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert msg["content"][0]["text"] == "Checking."
    assert (fc["call_id"], fc["name"], fc["arguments"], fc["status"]) == (
        "call_1",
        "get_weather",
        '{"city": "Paris"}',
        "completed",
    )
    assert [i["id"][:3] for i in final["output"]] == ["rs_", "msg", "fc_"]
    assert final["reasoning"]["effort"] == "high"


def test_reasoning_only_still_ends_in_a_message_streamed_or_not(tok):
    events = _encode(
        ResponsesStream(_builder(tok)),
        [
            pipeline.Started(0),
            pipeline.Delta(0, Piece("", reasoning="Hmm")),
            pipeline.Finished(0, "length"),
            pipeline.Completed(pipeline.TokenCounts(5, 1, 0)),
        ],
    )
    streamed = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    choice = FinishedChoice(0, "", "length", reasoning="Hmm")
    body = _builder(tok).body(pipeline.Outcome([choice], pipeline.TokenCounts(5, 1, 0)))
    assert (
        [(i["type"], i["status"]) for i in streamed["output"]]
        == [(i.type, i.status) for i in body.output]
        == [("reasoning", "incomplete"), ("message", "incomplete")]
    )


def test_tool_choice_auto_without_tools_is_plain_text(client, engine):
    result = post(client, tool_choice="auto", tools=[])
    assert result.status_code == 200, result.text
    assert engine.submitted[0].constraint is None


def test_output_text_logprobs_are_the_answers_tokens_only(tok):
    def lp(*token_ids: int) -> list[TokenLogprob]:
        return [TokenLogprob(t, -0.5, (), 0) for t in token_ids]

    builder = _builder(tok, include=["message.output_text.logprobs"])
    events = _encode(
        ResponsesStream(builder),
        [
            pipeline.Started(0),
            pipeline.Delta(0, Piece("", lp(10, 11), reasoning="Let me think.")),
            pipeline.Delta(0, Piece("Paris", lp(20))),
            pipeline.Delta(0, Piece("", lp(21))),  # the last token completed no text
            pipeline.Finished(0, "stop"),
            pipeline.Completed(pipeline.TokenCounts(5, 4, 0)),
        ],
    )
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    assert [tok.token_entry(t)[0] for t in (20, 21)] == [entry["token"] for entry in done["logprobs"]]
    assert events[-1]["response"]["output"][1]["content"][0]["logprobs"] == done["logprobs"]


def test_finished_choice_with_reasoning_and_calls(tok):
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    choice = FinishedChoice(0, "", "tool_calls", tool_calls=[call], reasoning="Hmm.")
    body = (
        _builder(tok)
        .body(pipeline.Outcome([choice], pipeline.TokenCounts(5, 4, 0)))
        .model_dump(mode="json", exclude_unset=True)
    )
    validate(body, "Response")
    assert [item["type"] for item in body["output"]] == ["reasoning", "function_call"]


# ---------------------------------------------------------------- input items


def test_input_items_become_chat_messages():
    request = ResponsesRequest.model_validate(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "T"}],
                },
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny and rain."}]},
            ],
        }
    )
    assert request.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "T",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "assistant", "content": "Sunny and rain."},
    ]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "whole conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "'web_search'"),
        ({"tools": [WEATHER, {"type": "code_interpreter", "container": {}}]}, "tools[1]", "'code_interpreter'"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "whole conversation"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
            "input_image",
        ),
        ({"input": [{"type": "web_search_call", "id": "w"}]}, "input[0].type", "web_search_call"),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
            "input[0].arguments",
            "JSON",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 3}}}}, "text.format.schema", ""),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type", "'xml'"),
        ({"input": []}, "input", "empty"),
        ({"input": 3}, "input", ""),
        ({"truncation": "auto"}, "truncation", "fit"),
        ({"input": [{"type": ["message"]}]}, "input[0].type", ""),
        ({"input": [{"role": ["user"], "content": "x"}]}, "input[0].role", ""),
        ({"input": [{"role": "user", "content": [{"type": {}, "text": "x"}]}]}, "input[0].content[0]", ""),
        ({"include": ["message.output_text.logprob"]}, "include[0]", ""),
        ({"top_logprobs": 21}, "top_logprobs", ""),
    ],
)
def test_what_cannot_be_done_is_a_400_naming_it(client, engine, body, param, words):
    result = post(client, **body)
    assert result.status_code == 400, result.text
    error = result.json["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]
    assert engine.submitted == []


def test_json_schema_format_is_the_engines_constraint(client, engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    engine.script(Script([]))
    body = post(
        client, text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    ).json
    validate(body, "Response")
    constraint = engine.submitted[0].constraint
    assert constraint is not None and constraint.kind == "json_schema" and json.loads(constraint.text) == schema
    assert body["text"]["format"]["name"] == "thing"


def test_reasoning_effort_reaches_a_template_that_takes_it(tok):
    mentions = {"reasoning_effort"}.__contains__
    assert ResponsesRequest.model_validate({"input": "x"}).template_kwargs(mentions) == {}
    off = ResponsesRequest.model_validate({"input": "x", "reasoning": {"effort": "none"}})
    assert off.template_kwargs(mentions) == {"reasoning_effort": "none"}
    high = ResponsesRequest.model_validate({"input": "x", "reasoning": {"effort": "high", "summary": "auto"}})
    assert high.template_kwargs(lambda name: False) == {}


@pytest.mark.parametrize(
    "effort, mentions, expected",
    [(None, False, None), ("none", False, False), ("high", False, True), ("none", True, None)],
)
def test_reasoning_effort_is_the_thinking_switch(effort, mentions, expected):
    """A thinking model with enable_thinking: the effort turns it on or off, unless the
    template takes reasoning_effort itself (gpt-oss)."""
    tok = SimpleNamespace(template_mentions=lambda name: mentions, has_thinking=True, can_toggle_thinking=True)
    assert effort_switch(effort, tok, "reasoning.effort") is expected


# ---------------------------------------------------------------- tools (a model that writes json_tools calls)


@pytest.fixture
def tool_client(tmp_path_factory):
    path = write_tokenizer_dir(tmp_path_factory.mktemp("tooltok"), chat_template=TOOLS_CHATML_TEMPLATE)
    tok = Tokenization.from_pretrained(path)
    engine = FakeEngineClient(model_info=TOOL_MODEL)
    return falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings())), engine, tok


def test_a_function_call_is_an_output_item(tool_client):
    client, engine, tok = tool_client
    engine.script(Script(ids(tok, CALL)))
    body = post(client, tools=[WEATHER]).json
    validate(body, "Response")
    [call] = body["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["call_id"].startswith("call_")
    assert body["tools"] == [WEATHER] and body["tool_choice"] == "auto"


def test_a_streamed_function_call(tool_client):
    client, engine, tok = tool_client
    engine.script(Script(ids(tok, CALL)))
    events = named_events(post(client, tools=[WEATHER], stream=True).text)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert json.loads(events[4]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_tool_choice_is_a_grammar(tool_client, choice):
    client, engine, tok = tool_client
    engine.script(Script(ids(tok, CALL)))
    body = post(client, tools=[WEATHER], tool_choice=choice).json
    validate(body, "Response")
    constraint = engine.submitted[0].constraint
    assert constraint is not None and constraint.kind == "lark" and "get_weather" in constraint.text
    assert body["tool_choice"] == choice


def test_a_tool_choice_naming_no_tool_is_a_400(tool_client):
    client, engine, _ = tool_client
    result = post(client, tools=[WEATHER], tool_choice={"type": "function", "name": "nope"})
    assert result.status_code == 400 and result.json["error"]["param"] == "tool_choice"


def test_function_call_output_reaches_the_template(tool_client):
    client, engine, tok = tool_client
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    ]
    post(client, tools=[WEATHER], input=items)
    prompt = tok.decode(engine.submitted[0].prompt_token_ids)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
