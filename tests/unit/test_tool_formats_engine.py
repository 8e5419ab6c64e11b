"""Every tool-call format through the real engine (random weights): a tokenizer and chat template
per format, mlx-lm's inference of the parser, and forced calls (required / named) parsed out of
what the grammar made the model write; formats that cannot be forced answer 400."""

from __future__ import annotations

import json

import falcon.testing
import jsonschema
import pytest

from engine.loading import load_model
from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.model_factory import build_tiny_model
from tests.tool_template import FORMAT_MODELS
from tests.unit.defaults import frontend_settings
from tests.unit.scheduler_client import SchedulerClient
from tests.unit.test_tool_markers import CHAT, MESSAGES, NAMED, TOOLS, streamed_calls

FORCIBLE = {"json_tools", "glm47", "longcat", "mistral", "kimi_k2", "kimi_k3", "harmony", "qwen3_coder", "minimax_m2"}
# (format, how the tokenizer holds its markers): special tokens as the real models, and a few others.
CASES = [(name, "special") for name in FORMAT_MODELS] + [
    ("glm47", "added"),
    ("harmony", "added"),
    ("mistral", "text"),
    ("qwen3_coder", "added"),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{k}" for n, k in CASES])
def served(request, tmp_path_factory):
    name, kind = request.param
    spec = FORMAT_MODELS[name]
    directory = tmp_path_factory.mktemp(f"format-{name}-{kind}")
    path = build_tiny_model(
        directory,
        chat_template=spec.template,
        tool_markers=kind if spec.markers else "text",
        markers=spec.markers,
        eos_markers=spec.eos_markers if kind != "text" else (),
    )
    model = load_model(str(path))
    engine = SchedulerClient(model)
    client = falcon.testing.TestClient(
        create_app(engine, Tokenization.from_pretrained(path), settings=frontend_settings())
    )
    return name, model, client


def chat(client, **body):
    # One call: random weights would go on adding calls inside a section for as long as max_tokens lets them.
    base = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, "parallel_tool_calls": False}
    return client.simulate_post(CHAT, json={**base, **body})


def check_calls(calls: list[dict], name: str | None) -> None:
    assert calls
    for call in calls:
        [tool] = [t for t in TOOLS if t["function"]["name"] == call["function"]["name"]]
        assert name is None or call["function"]["name"] == name
        schema = tool["function"].get("parameters", {"type": "object", "additionalProperties": False})
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


def test_the_format_is_inferred_as_mlx_lm_does(served):
    name, model, _ = served
    assert model.info.tool_parser == name


@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_forced_call_parses_or_the_format_says_it_cannot(served, choice):
    name, _, client = served
    result = chat(client, tool_choice=NAMED if choice == "named" else "required", temperature=1.0, seed=7)
    if name not in FORCIBLE:
        assert result.status_code == 400, result.text
        assert name in result.json["error"]["message"] and result.json["error"]["param"] == "tool_choice"
        return
    assert result.status_code == 200, result.text
    [answer] = result.json["choices"]
    assert answer["finish_reason"] == "tool_calls", answer
    assert not answer["message"]["content"]
    check_calls(answer["message"]["tool_calls"], "get_weather" if choice == "named" else None)


@pytest.mark.parametrize("served", [c for c in CASES if c[0] in FORCIBLE], indirect=True)
def test_a_forced_call_streams(served):
    _, _, client = served
    result = chat(client, tool_choice="required", temperature=0.0, stream=True)
    assert result.status_code == 200, result.text
    calls, content, finish = streamed_calls(result)
    assert finish == "tool_calls" and content == ""
    check_calls(calls, None)


def test_auto_answers(served):
    _, _, client = served
    result = chat(client, temperature=0.0, max_tokens=16)
    assert result.status_code == 200, result.text
    assert result.json["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("served", [c for c in CASES if c[0] == "harmony"], indirect=True)
def test_harmony_json_answer_is_the_final_channel(served):
    _, _, client = served
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for tools in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        body = {"messages": MESSAGES, "max_tokens": 60, "temperature": 0.0, "response_format": response_format, **tools}
        result = client.simulate_post(CHAT, json=body)
        assert result.status_code == 200, result.text
        [answer] = result.json["choices"]
        assert answer["finish_reason"] == "stop" and not answer["message"].get("tool_calls")
        jsonschema.validate(json.loads(answer["message"]["content"]), schema)
