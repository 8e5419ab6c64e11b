"""Forced tool calls end to end (chat endpoint -> real scheduler on the tiny model -> parsed calls),
with the tool-call markers held three ways by the tokenizer: plain text, added non-special tokens
(Qwen 2.5/3, Hermes) and special tokens. The weights are random: only the grammar makes the calls.
"""

from __future__ import annotations

import json

import falcon.testing
import jsonschema
import mlx.core as mx
import pytest

from engine.constraints import GrammarCompiler, GrammarProcessor
from engine.loading import load_model
from frontend.app import create_app
from frontend.tokenization import Tokenization
from ipc.messages import Constraint, Generate
from tests.model_factory import TOOL_CALL_END, TOOL_CALL_START, TOOL_MARKER_KINDS, build_tiny_model
from tests.openai_schema import validate
from tests.tool_template import TOOLS_CHATML_TEMPLATE
from tests.unit.defaults import frontend_settings
from tests.unit.scheduler_client import SchedulerClient
from tests.unit.test_frontend_chat import sse_payloads

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# Bounded strings and enums: any path through the schema ends well within max_tokens.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# The markers as bytes: right for plain-text markers, refused by llguidance
# where the tokenizer has them as tokens.
BYTES_GRAMMAR = 'start: "<tool_call>" "\\n" %json{"type": "object"} "\\n" "</tool_call>"'


@pytest.fixture(scope="module", params=TOOL_MARKER_KINDS)
def loaded(request, tmp_path_factory):
    kind = request.param
    directory = tmp_path_factory.mktemp(f"markers-{kind}")
    path = build_tiny_model(directory, chat_template=TOOLS_CHATML_TEMPLATE, tool_markers=kind)
    return kind, path, load_model(str(path))


def make_client(loaded, rewrite=None, skip_special_tokens=False) -> tuple[falcon.testing.TestClient, SchedulerClient]:
    _, path, model = loaded
    engine = SchedulerClient(model, rewrite)
    tok = Tokenization.from_pretrained(path, skip_special_tokens=skip_special_tokens)
    return falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings())), engine


def chat(client, **body):
    return client.simulate_post(CHAT, json={"messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, **body})


def check_calls(calls: list[dict], name: str | None = None) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        [tool] = [t for t in TOOLS if t["function"]["name"] == call["function"]["name"]]
        assert name is None or tool["function"]["name"] == name
        schema = tool["function"].get("parameters", {"type": "object"})
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


def streamed_calls(result) -> tuple[list[dict], str, str | None]:
    """(calls, content, finish_reason) put together from the chunks, as the openai SDK does."""
    payloads = sse_payloads(result.text)
    assert payloads[-1] == "[DONE]"
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in payloads[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
        choice = chunk["choices"][0]
        finish = choice["finish_reason"] or finish
        content += choice["delta"].get("content") or ""
        for part in choice["delta"].get("tool_calls") or []:
            call = calls.setdefault(part["index"], {"type": "function", "function": {"arguments": ""}})
            call["id"] = part.get("id") or call.get("id")
            function = part.get("function") or {}
            call["function"]["name"] = function.get("name") or call["function"].get("name")
            call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)], content, finish


def test_the_tokenizer_holds_the_markers_as_built(loaded):
    kind, path, model = loaded
    assert (model.info.tool_parser, model.info.tool_call_start, model.info.tool_call_end) == (
        "json_tools",
        TOOL_CALL_START,
        TOOL_CALL_END,
    )
    hf = Tokenization.from_pretrained(path).hf
    ids = hf.encode(TOOL_CALL_START, add_special_tokens=False)
    added = {t.content: t for t in hf.added_tokens_decoder.values()}
    if kind == "text":
        assert len(ids) > 1 and TOOL_CALL_START not in added
    else:
        assert len(ids) == 1 and added[TOOL_CALL_START].special == (kind == "special")


@pytest.mark.parametrize("choice", ["required", "named"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_calls_parse(loaded, choice, temperature):
    kind = loaded[0]
    client, engine = make_client(loaded)
    tool_choice = NAMED if choice == "named" else "required"
    result = chat(client, tool_choice=tool_choice, temperature=temperature, seed=3)
    assert result.status_code == 200, result.text
    validate(result.json, "CreateChatCompletionResponse")
    [answer] = result.json["choices"]
    assert answer["finish_reason"] == "tool_calls", answer
    assert answer["message"]["content"] is None
    check_calls(answer["message"]["tool_calls"], "get_weather" if choice == "named" else None)
    grammar = engine.submitted[0].constraint.text
    marker_id = Tokenization.from_pretrained(loaded[1]).marker_token_id(TOOL_CALL_START)
    assert (f"<[{marker_id}]>" in grammar) == (kind != "text") == (marker_id is not None)


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_parse_streamed(loaded, choice):
    client, _ = make_client(loaded)
    tool_choice = NAMED if choice == "named" else "required"
    result = chat(client, tool_choice=tool_choice, temperature=1.0, seed=5, stream=True)
    assert result.status_code == 200, result.text
    calls, content, finish = streamed_calls(result)
    assert finish == "tool_calls" and content == ""
    check_calls(calls, "get_weather" if choice == "named" else None)


def test_skipped_special_markers_still_reach_the_parser(loaded):
    kind = loaded[0]
    client, _ = make_client(loaded, skip_special_tokens=True)
    for stream in (False, True):
        result = chat(client, tool_choice="required", parallel_tool_calls=False, temperature=0.0, stream=stream)
        assert result.status_code == 200, (kind, result.text)
        if stream:
            calls, content, finish = streamed_calls(result)
        else:
            answer = result.json["choices"][0]
            message = answer["message"]
            calls, content, finish = message.get("tool_calls") or [], message["content"], answer["finish_reason"]
        assert finish == "tool_calls" and not content
        check_calls(calls)


@pytest.mark.parametrize("loaded", ["added", "special"], indirect=True)
def test_an_engine_failure_is_one_short_sentence(loaded, caplog):
    """A grammar the engine cannot follow (the markers as bytes, where the tokenizer has them as tokens):
    the client gets a short server_error; the parser state and grammar stay in the log."""

    def bytes_grammar(request: Generate) -> Generate:
        return Generate(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            max_tokens=request.max_tokens,
            sampling=request.sampling,
            constraint=Constraint(kind="lark", text=BYTES_GRAMMAR),
        )

    client, _ = make_client(loaded, rewrite=bytes_grammar)
    result = chat(client, tool_choice="required", temperature=0.0)
    assert result.status_code == 500
    error = result.json["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    message = error["message"]
    assert message.startswith("generation failed in the engine: constrained decoding failed")
    assert "\n" not in message and len(message) < 200
    for internal in ("<grammar>", "<state>", "start:", "Parser", "%json", "tool_call"):
        assert internal not in result.text
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "engine.constraints")
    assert "doesn't satisfy the grammar" in logged


@pytest.mark.parametrize("loaded", ["text"], indirect=True)
def test_a_processor_error_is_short_and_logged_in_full(loaded, caplog):
    _, _, model = loaded
    info = model.info
    compiler = GrammarCompiler(model.tokenizer, info.vocab_size, info.eos_token_ids)
    processor = compiler.processor(Constraint(kind="lark", text='start: "ab"'))
    assert isinstance(processor, GrammarProcessor)
    logits = mx.zeros((1, info.vocab_size))
    processor(mx.array([1]), logits)
    eos = info.eos_token_ids[0]
    processor(mx.array([1, eos]), logits)  # EOS where the grammar wants "ab"
    assert processor.error == f"constrained decoding failed: the grammar refused token {eos}"
    assert 'start: "ab"' in "\n".join(r.getMessage() for r in caplog.records if r.name == "engine.constraints")
