"""An agent's request near a 64k context: a long system prompt and many tools (~60k tokens) is
accepted and answered by the real scheduler (a tiny model with max_position_embeddings 65536),
a forced call still parses; one token past the context is a 400 before any prefill."""

from __future__ import annotations

import json

import falcon.testing
import pytest

from engine.loading import load_model
from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.model_factory import build_tiny_model
from tests.tool_template import TOOLS_CHATML_TEMPLATE
from tests.unit.defaults import frontend_settings
from tests.unit.scheduler_client import SchedulerClient

CHAT = "/v1/chat/completions"
CONTEXT = 65536
TOOL_COUNT = 128  # OpenAI's largest number of tools
SENTENCE = "Look up the opening hours of a museum in a city, by its name, on a given day of the week. "


def tool(i: int, sentences: int) -> dict:
    return {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": SENTENCE * sentences,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}, "day": {"enum": ["mon", "tue"]}},
                "required": ["city", "day"],
                "additionalProperties": False,
            },
        },
    }


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> falcon.testing.TestClient:
    path = build_tiny_model(
        tmp_path_factory.mktemp("long"),
        size="long",
        chat_template=TOOLS_CHATML_TEMPLATE,
        tool_markers="added",
        context=CONTEXT,
    )
    model = load_model(str(path))
    assert model.info.context_length == CONTEXT
    app = create_app(SchedulerClient(model), Tokenization.from_pretrained(path), settings=frontend_settings())
    return falcon.testing.TestClient(app)


def body(sentences: int, **extra) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You are a careful travel agent. " + SENTENCE * 40},
            {"role": "user", "content": "When is the Louvre open on Monday?"},
        ],
        "tools": [tool(i, sentences) for i in range(TOOL_COUNT)],
        "max_tokens": 60,
        **extra,
    }


def test_sixty_thousand_tokens_of_tools_are_answered(client):
    result = client.simulate_post(CHAT, json=body(6, tool_choice="required", temperature=0.0))
    assert result.status_code == 200, result.text
    usage = result.json["usage"]
    assert 55_000 < usage["prompt_tokens"] < CONTEXT - 60, usage
    [answer] = result.json["choices"]
    assert answer["finish_reason"] == "tool_calls"
    for call in answer["message"]["tool_calls"]:
        assert call["function"]["name"].startswith("tool_") and json.loads(call["function"]["arguments"])["day"]


def test_past_the_context_is_a_400(client):
    result = client.simulate_post(CHAT, json=body(8))
    assert result.status_code == 400, result.text
    error = result.json["error"]
    assert error["code"] == "context_length_exceeded" and str(CONTEXT) in error["message"]
