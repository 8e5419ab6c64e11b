"""Unknown and unsupported request fields: harmless ones accepted, the rest a 400 naming them."""

from __future__ import annotations

import falcon.testing
import pytest

from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.openai_schema import validate
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import CHATML_TEMPLATE, write_tokenizer_dir

URL = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]
EFFORT_TEMPLATE = CHATML_TEMPLATE + "{% if reasoning_effort %}{{ 'effort: ' + reasoning_effort }}{% endif %}"


@pytest.mark.parametrize(
    "extra",
    [
        {"metadata": {"team": "a"}},
        {"store": True},
        {"service_tier": "auto"},
        {"prompt_cache_key": "k1", "prompt_cache_retention": "24h"},
        {"safety_identifier": "u-1", "user": "u-1"},
        {"some_future_field": [1, 2, 3]},
        {"parallel_tool_calls": True},
    ],
)
def test_harmless_fields_are_accepted(client, engine, extra):
    result = client.simulate_post(URL, json={"messages": MESSAGES, **extra})
    assert result.status_code == 200, result.text
    assert len(engine.submitted) == 1


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"moderation": {"model": "omni"}}, "moderation"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"verbosity": "high"}, "verbosity"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_unsupported_fields_are_refused(client, engine, extra, param):
    result = client.simulate_post(URL, json={"messages": MESSAGES, **extra})
    assert result.status_code == 400, result.text
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["param"] == param
    assert result.json["error"]["code"] == "unsupported_parameter"
    assert engine.submitted == []


def test_reasoning_effort_reaches_a_template_that_uses_it(engine, tmp_path):
    tok = Tokenization.from_pretrained(write_tokenizer_dir(tmp_path / "t", chat_template=EFFORT_TEMPLATE))
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    result = client.simulate_post(URL, json={"messages": MESSAGES, "reasoning_effort": "low"})
    assert result.status_code == 200, result.text
    assert tok.decode(engine.submitted[0].prompt_token_ids).endswith("effort: low")
