"""POST /v1/completions against a fake engine."""

from __future__ import annotations

import falcon.testing
import pytest

from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.openai_schema import validate, validate_completion_chunk
from tests.sse import sse_events
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import Script

URL = "/v1/completions"


def ids(tok: Tokenization, text: str) -> list[int]:
    return tok.hf.encode(text, add_special_tokens=False)


def sse_payloads(text: str) -> list:
    assert text.endswith("\n\n"), text[-50:]
    return sse_events(text)


def test_string_prompt(client, engine, tok):
    engine.script(Script(ids(tok, " the capital of France."), cached_prompt_tokens=2))
    result = client.simulate_post(URL, json={"model": "x", "prompt": "Paris is", "max_tokens": 20})
    assert result.status_code == 200, result.text
    body = result.json
    validate(body, "CreateCompletionResponse")
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == "tiny-test-model"
    # A completion keeps its first token's leading space (chat drops it, as mlx-lm).
    assert body["choices"] == [
        {"index": 0, "text": " the capital of France.", "logprobs": None, "finish_reason": "stop"}
    ]
    [request] = engine.submitted
    assert request.prompt_token_ids == tok.hf.encode("Paris is")
    assert body["usage"]["prompt_tokens"] == len(request.prompt_token_ids)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}


@pytest.mark.parametrize(
    "prompt_of",
    [
        lambda tok: ["Hello", "Paris"],
        lambda tok: [ids(tok, "Hello"), ids(tok, "Paris")],
    ],
)
def test_many_prompts_times_n(client, engine, tok, prompt_of):
    engine.script(*(Script(ids(tok, word)) for word in ("a", "b", "c", "d")))
    body = client.simulate_post(URL, json={"prompt": prompt_of(tok), "n": 2, "max_tokens": 5}).json
    validate(body, "CreateCompletionResponse")
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    prompts = [g.prompt_token_ids for g in engine.submitted]
    assert prompts == [ids(tok, "Hello")] * 2 + [ids(tok, "Paris")] * 2
    assert body["usage"]["prompt_tokens"] == len(ids(tok, "Hello")) + len(ids(tok, "Paris"))
    assert body["usage"]["completion_tokens"] == 4


def test_token_prompt(client, engine, tok):
    prompt = ids(tok, "The quick brown fox")
    client.simulate_post(URL, json={"prompt": prompt, "max_tokens": 5})
    assert engine.submitted[0].prompt_token_ids == prompt


def test_echo(client, engine, tok):
    engine.script(Script(ids(tok, " jumps")), Script(ids(tok, " jumps")))
    body = client.simulate_post(URL, json={"prompt": "The quick brown fox", "echo": True, "max_tokens": 5}).json
    assert body["choices"][0]["text"] == "The quick brown fox jumps"
    result = client.simulate_post(URL, json={"prompt": "The quick brown fox", "echo": True, "stream": True})
    payloads = sse_payloads(result.text)
    for chunk in payloads[:-1]:
        validate_completion_chunk(chunk)
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == "The quick brown fox jumps"


def test_stream_with_usage_and_stop(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world! Hello there")))
    result = client.simulate_post(
        URL, json={"prompt": "x", "stream": True, "stop": "! H", "stream_options": {"include_usage": True}}
    )
    assert result.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(result.text)
    assert payloads[-1] == "[DONE]"
    for chunk in payloads[:-1]:
        validate_completion_chunk(chunk)
    *chunks, usage_chunk = payloads[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == 1
    assert ("abort", engine.submitted[0].request_id) in engine.events


def test_length_finish(client, engine, tok):
    engine.script(Script(ids(tok, "The quick brown fox jumps over the lazy dog.")))
    body = client.simulate_post(URL, json={"prompt": "x", "max_tokens": 2}).json
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"logprobs": 2, "echo": True}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_unsupported(client, engine, extra, param):
    result = client.simulate_post(URL, json={"prompt": "x", **extra})
    assert result.status_code == 400
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["param"] == param
    assert engine.submitted == []


def test_best_of_equal_to_n_is_plain_n(client, engine):
    assert client.simulate_post(URL, json={"prompt": "x", "n": 2, "best_of": 2, "max_tokens": 1}).status_code == 200
    assert len(engine.submitted) == 2


@pytest.mark.parametrize(
    "prompt",
    [[], [[]], [1, "a"], [[1], ["a"]], 5, None, [[1, 2], 3], [1.5]],
)
def test_bad_prompts(client, engine, prompt):
    result = client.simulate_post(URL, json={"prompt": prompt})
    assert result.status_code == 400, result.text
    assert result.json["error"]["param"] == "prompt"
    assert engine.submitted == []


def test_token_out_of_vocabulary(client):
    result = client.simulate_post(URL, json={"prompt": [1, 99999]})
    assert result.status_code == 400 and "99999" in result.json["error"]["message"]


def test_context_overflow_names_both_numbers(client, engine):
    result = client.simulate_post(URL, json={"prompt": list(range(1, 201)), "max_tokens": 100})
    assert result.status_code == 400
    error = result.json["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "256" in error["message"] and "200" in error["message"] and "100" in error["message"]
    assert engine.submitted == []


def test_too_many_choices(engine, tok):
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings(max_choices=3)))
    result = client.simulate_post(URL, json={"prompt": ["a", "b"], "n": 2})
    assert result.status_code == 400 and result.json["error"]["param"] == "prompt"


def test_engine_unavailable(client, engine):
    engine.available = False
    result = client.simulate_post(URL, json={"prompt": "x"})
    assert result.status_code == 503 and "retry-after" in result.headers


def test_echo_of_token_ids_outside_the_vocabulary_is_400(client, engine):
    result = client.simulate_post("/v1/completions", json={"prompt": [[-160, 6223]], "echo": True})
    assert result.status_code == 400, result.text
    assert result.json["error"]["param"] == "prompt"
    assert engine.submitted == []
