"""tools / tool_choice: plans, grammars, the call splitter and the chat endpoint (fake engine)."""

from __future__ import annotations

import json
import threading
from wsgiref.simple_server import make_server

import falcon.testing
import llguidance
import openai
import pytest

from frontend.app import create_app
from frontend.errors import APIError
from frontend.tokenization import Tokenization
from frontend.tools import Splitter, plan_tools
from ipc.messages import Constraint
from tests.openai_schema import validate
from tests.tool_template import TOOLS_CHATML_TEMPLATE
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, Script, make_model_info, write_tokenizer_dir
from tests.unit.test_frontend_chat import sse_payloads
from tests.unit.test_frontend_openai_client import _QuietHandler, _ThreadedServer

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
TOOL_MODEL = make_model_info(
    context_length=4096, tool_parser="json_tools", tool_call_start="<tool_call>", tool_call_end="</tool_call>"
)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def no_specials(text: str):
    return None


def splitter(single: bool = False) -> Splitter:
    plan = plan_tools(TOOLS, "auto", False if single else None, TOOL_MODEL, no_specials)
    out = plan.splitter()
    assert out is not None
    return out


def run_splitter(s: Splitter, pieces: list[str]) -> tuple[str, list]:
    content, calls = "", []
    for piece in pieces:
        text, new, _ = s.feed(piece)
        content += text
        calls += new
    return content + s.flush().text, calls


# ---------------------------------------------------------------- splitter


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_splitter_cuts_calls_out_whatever_the_piece_size(size):
    text = "Let me check." + "\n" + CALL + "\n" + CALL.replace("Paris", "Rome")
    content, calls = run_splitter(splitter(), [text[i : i + size] for i in range(0, len(text), size)])
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_splitter_keeps_what_is_not_a_call():
    content, calls = run_splitter(splitter(), ["a <tool_c", "all is not here", " <tool_call>{broken}</tool_call> z"])
    assert calls == []
    assert content == "a <tool_call is not here <tool_call>{broken}</tool_call> z"
    content, calls = run_splitter(splitter(), ['x <tool_call>\n{"name": "get_we'])  # cut by max_tokens
    assert calls == [] and content == 'x <tool_call>\n{"name": "get_we'


def test_splitter_drops_whitespace_around_calls_only():
    assert run_splitter(splitter(), ["\n", "\n", CALL, "\n"])[0] == ""
    assert run_splitter(splitter(), ["\n", "\n", "hi"])[0] == "\n\nhi"
    assert run_splitter(splitter(), ["\n \n"])[0] == "\n \n"


def test_splitter_single_call_ignores_the_rest():
    s = splitter(single=True)
    content, calls, _ = s.feed(CALL + "\n" + CALL)
    assert len(calls) == 1 and s.done and content == ""
    assert s.flush().text == ""


def test_list_of_calls_in_one_block():
    body = '<tool_call>[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": "{}"}]</tool_call>'
    _, calls = run_splitter(splitter(), [body])
    assert [(c.name, c.arguments) for c in calls] == [("get_time", "{}"), ("get_weather", "{}")]


# ---------------------------------------------------------------- plans


def compiles(constraint: Constraint) -> bool:
    grammar = llguidance.LLMatcher.grammar_from_lark(constraint.text)
    return not llguidance.LLMatcher.validate_grammar_with_warnings(grammar)[0]


def test_plan_modes():
    auto = plan_tools(TOOLS, None, None, TOOL_MODEL, no_specials)
    assert auto.template_tools == TOOLS and auto.format is not None and auto.constraint is None
    none = plan_tools(TOOLS, "none", None, TOOL_MODEL, no_specials)
    assert none.template_tools == TOOLS and none.format is None and none.constraint is None
    required = plan_tools(TOOLS, "required", None, TOOL_MODEL, no_specials)
    assert required.constraint.kind == "lark" and compiles(required.constraint)
    assert '"get_weather"' in required.constraint.text and '"get_time"' in required.constraint.text
    assert "call)*" in required.constraint.text and not required.single
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None, TOOL_MODEL, no_specials)
    assert named.single and compiles(named.constraint) and '"get_weather"' not in named.constraint.text
    assert plan_tools(None, None, None, TOOL_MODEL, no_specials).template_tools is None


def test_special_marker_tokens_are_named_by_id():
    plan = plan_tools(TOOLS, "required", None, TOOL_MODEL, lambda text: {"<tool_call>": 7, "</tool_call>": 8}[text])
    assert "<[7]>" in plan.constraint.text and "<[8]>" in plan.constraint.text


def test_auto_with_response_format_is_calls_or_answer():
    answer = Constraint(kind="json_schema", text='{"type":"object"}')
    plan = plan_tools(TOOLS, "auto", None, TOOL_MODEL, no_specials, answer)
    assert plan.constraint.text.startswith("start: calls | answer") and compiles(plan.constraint)
    forced = plan_tools(TOOLS, "required", None, TOOL_MODEL, no_specials, answer)
    assert forced.constraint.text.startswith("start: calls\n")


@pytest.mark.parametrize(
    "tools, choice, param",
    [
        ([{"type": "retrieval"}], None, "tools[0].type"),
        ([{"type": "function"}], None, "tools[0].function"),
        ([{"type": "function", "function": {"name": "a b"}}], None, "tools[0].function.name"),
        ([WEATHER, WEATHER], None, "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], None, "tools[0].function.description"),
        (None, "required", "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (TOOLS, {"type": "function", "function": {}}, "tool_choice.function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "required", "tools"),
    ],
)
def test_plan_errors(tools, choice, param):
    with pytest.raises(APIError) as info:
        plan_tools(tools, choice, None, TOOL_MODEL, no_specials)
    assert info.value.status == 400 and info.value.param == param


def test_model_without_tool_format_refuses_tools_but_not_none():
    plain = make_model_info()
    with pytest.raises(APIError) as info:
        plan_tools(TOOLS, "auto", None, plain, no_specials)
    assert info.value.param == "tools" and info.value.code == "unsupported_parameter"
    unknown = make_model_info(tool_parser="no_such_parser")
    with pytest.raises(APIError) as info:
        plan_tools(TOOLS, "auto", None, unknown, no_specials)
    assert "no_such_parser" in info.value.message and info.value.param == "tools"
    assert plan_tools(TOOLS, "none", None, plain, no_specials).template_tools == TOOLS


# ---------------------------------------------------------------- the endpoint


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenization:
    path = write_tokenizer_dir(tmp_path_factory.mktemp("tok"), chat_template=TOOLS_CHATML_TEMPLATE)
    return Tokenization.from_pretrained(path)


@pytest.fixture
def engine() -> FakeEngineClient:
    return FakeEngineClient(model_info=TOOL_MODEL)


@pytest.fixture
def client(engine, tok) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))


def ids(tok: Tokenization, text: str) -> list[int]:
    return tok.hf.encode(text, add_special_tokens=False)


def chat(client, **body):
    return client.simulate_post(CHAT, json={"messages": MESSAGES, "tools": TOOLS, **body})


def test_tools_reach_the_template(client, engine, tok):
    assert chat(client).status_code == 200
    prompt = engine.submitted[0].prompt_token_ids
    assert prompt == tok.render_chat(MESSAGES, tools=TOOLS)
    assert "get_weather" in tok.decode(prompt) and "<tools>" in tok.decode(prompt)


def test_tool_call_response(client, engine, tok):
    engine.script(Script(ids(tok, CALL)))
    result = chat(client, tool_choice="auto")
    assert result.status_code == 200, result.text
    body = result.json
    validate(body, "CreateChatCompletionResponse")
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert engine.submitted[0].constraint is None


def test_text_answer_with_tools_is_plain(client, engine, tok):
    engine.script(Script(ids(tok, "It is sunny.")))
    body = chat(client).json
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny.", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"


def test_tool_choice_none_leaves_calls_as_text(client, engine, tok):
    engine.script(Script(ids(tok, CALL)))
    body = chat(client, tool_choice="none").json
    assert body["choices"][0]["message"]["content"] == CALL
    assert body["choices"][0]["finish_reason"] == "stop"


def test_required_and_named_send_a_grammar(client, engine, tok):
    engine.script(Script(ids(tok, CALL)), Script(ids(tok, CALL)))
    assert chat(client, tool_choice="required").json["choices"][0]["finish_reason"] == "tool_calls"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert chat(client, tool_choice=named, response_format={"type": "json_object"}).status_code == 200
    required, forced = (g.constraint for g in engine.submitted)
    assert required.kind == forced.kind == "lark"
    assert '"const": "get_weather"' in forced.text and "get_time" not in forced.text


def test_streamed_tool_calls(client, engine, tok):
    engine.script(Script(ids(tok, "Checking.\n" + CALL + "\n" + CALL.replace("Paris", "Rome")), chunk=2))
    payloads = sse_payloads(chat(client, stream=True).text)
    assert payloads[-1] == "[DONE]"
    content, calls = "", []
    for chunk in payloads[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
        delta = chunk["choices"][0]["delta"]
        content += delta.get("content") or ""
        calls += delta.get("tool_calls") or []
    assert content == "Checking."
    assert [c["index"] for c in calls] == [0, 1]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert payloads[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_parallel_false_stops_after_one_call(client, engine, tok):
    engine.script(Script(ids(tok, CALL + "\n" + CALL + " and more text")))
    body = chat(client, parallel_tool_calls=False).json
    assert len(body["choices"][0]["message"]["tool_calls"]) == 1
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert ("abort", engine.submitted[0].request_id) in engine.events


def test_tool_history_messages_render(client, engine, tok):
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    result = client.simulate_post(CHAT, json={"messages": messages, "tools": TOOLS})
    assert result.status_code == 200, result.text
    prompt = tok.decode(engine.submitted[0].prompt_token_ids)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt and "<tool_response>" in prompt


def test_openai_client_streams_and_accumulates_calls(engine, tok):
    engine.script(Script(ids(tok, CALL), chunk=3), Script(ids(tok, CALL)))
    server = make_server(
        "127.0.0.1",
        0,
        create_app(engine, tok, settings=frontend_settings()),
        server_class=_ThreadedServer,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="x", max_retries=0)
        with client.chat.completions.stream(model="m", messages=MESSAGES, tools=TOOLS) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        [call] = final.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        assert final.choices[0].finish_reason == "tool_calls"
        plain = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required")
        assert plain.choices[0].message.tool_calls[0].function.name == "get_weather"
    finally:
        server.shutdown()
        server.server_close()


DUMP = "\n".join(
    ["constrained decoding failed at token 7: Parser Error", "<state>", "Tokens: 7", "</state><grammar>", 'start: "x"']
)


def test_an_engine_error_reaches_the_client_as_one_line(client, engine, caplog):
    engine.script(Script([], finish_reason="error", error=DUMP), Script([], finish_reason="error", error=DUMP))
    result = chat(client, tool_choice="required")
    assert result.status_code == 500
    validate(result.json, "ErrorResponse")
    error = result.json["error"]
    assert error["type"] == "server_error"
    assert error["message"] == "generation failed in the engine: constrained decoding failed at token 7: Parser Error"
    streamed = chat(client, tool_choice="required", stream=True).text
    assert sse_payloads(streamed)[-1]["error"]["message"] == error["message"]
    assert "<grammar>" not in streamed and "<grammar>" not in result.text
    assert "<grammar>" in caplog.text  # the whole of it is in the log
