"""POST /tokenize and POST /detokenize (vLLM's shapes): the same ids the generation endpoints send."""

from __future__ import annotations

import falcon.testing
import pytest

from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.openai_schema import validate
from tests.tool_template import TOOLS_CHATML_TEMPLATE
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, write_tokenizer_dir

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_a_prompt_has_the_ids_a_completion_sends(client, engine, tok):
    result = client.simulate_post("/tokenize", json={"model": "x", "prompt": "The quick brown fox"})
    assert result.status_code == 200, result.text
    ids = tok.encode_prompt("The quick brown fox")
    assert result.json == {"count": len(ids), "max_model_len": engine.model.context_length, "tokens": ids}
    client.simulate_post("/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": 1})
    assert engine.submitted[0].prompt_token_ids == ids


def test_messages_have_the_ids_a_chat_completion_sends(client, engine):
    result = client.simulate_post("/tokenize", json={"messages": MESSAGES})
    assert result.status_code == 200, result.text
    client.simulate_post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
    assert result.json["tokens"] == engine.submitted[0].prompt_token_ids
    assert result.json["count"] == len(result.json["tokens"])


def test_without_the_generation_prompt(client, tok):
    with_prompt = client.simulate_post("/tokenize", json={"messages": MESSAGES}).json["tokens"]
    without = client.simulate_post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False})
    assert tok.decode(with_prompt).startswith(tok.decode(without.json["tokens"]))
    assert without.json["count"] < len(with_prompt)


def test_tools_reach_the_template(engine, tmp_path):
    tok = Tokenization.from_pretrained(write_tokenizer_dir(tmp_path / "t", chat_template=TOOLS_CHATML_TEMPLATE))
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    plain = client.simulate_post("/tokenize", json={"messages": MESSAGES}).json["count"]
    result = client.simulate_post("/tokenize", json={"messages": MESSAGES, "tools": tools})
    assert result.json["count"] > plain
    assert "get_time" in tok.decode(result.json["tokens"])


def test_token_strings_on_request(client, tok):
    result = client.simulate_post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    assert result.json["token_strs"] == tok.hf.convert_ids_to_tokens(result.json["tokens"])


def test_detokenize_is_the_inverse(client):
    ids = client.simulate_post("/tokenize", json={"messages": MESSAGES}).json["tokens"]
    result = client.simulate_post("/detokenize", json={"model": "x", "tokens": ids})
    assert result.status_code == 200, result.text
    assert result.json == {"prompt": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
                           "<|im_start|>assistant\n"}  # fmt: skip


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ("/detokenize", {"tokens": [1, 100000]}, "tokens[1]"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ],
)
def test_bad_requests_get_400_naming_the_field(client, path, body, param):
    result = client.simulate_post(path, json=body)
    assert result.status_code == 400, result.text
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["param"] == param


def test_behind_the_api_key_like_the_v1_routes(tok):
    client = falcon.testing.TestClient(
        create_app(FakeEngineClient(), tok, settings=frontend_settings(api_keys=("sekrit",)))
    )
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
        assert client.simulate_post(path, json=body).status_code == 401
        ok = client.simulate_post(path, json=body, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200, ok.text
