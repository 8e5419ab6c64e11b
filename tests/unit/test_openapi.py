"""GET /openapi.json: generated from the models, and true of real responses."""

from __future__ import annotations

import json
import re

import falcon.testing
import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from frontend.app import ROUTES, create_app
from frontend.openapi import openapi_document
from frontend.tokenization import Tokenization
from tests.tool_template import TOOLS_CHATML_TEMPLATE
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, Script, make_model_info, write_tokenizer_dir
from tests.unit.test_frontend_chat import sse_payloads

TOOL_MODEL = make_model_info(
    context_length=4096, tool_parser="json_tools", tool_call_start="<tool_call>", tool_call_end="</tool_call>"
)
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "hi"}]


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


def validator(name: str) -> jsonschema.Draft202012Validator:
    doc = openapi_document()
    registry = Registry().with_resource("urn:self", Resource.from_contents(doc, default_specification=DRAFT202012))
    return jsonschema.Draft202012Validator({"$ref": f"urn:self#/components/schemas/{name}"}, registry=registry)


def test_document_is_served_and_well_formed(client):
    result = client.simulate_get("/openapi.json")
    assert result.status_code == 200
    doc = result.json
    assert doc == json.loads(json.dumps(openapi_document()))
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/openapi.json"} <= set(doc["paths"])
    for _name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
    request = doc["components"]["schemas"]["ChatCompletionRequest"]
    for field in ("messages", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "seed"):
        assert field in request["properties"], field
    assert request["required"] == ["messages"]


def test_requests_in_the_document_match_what_the_server_accepts():
    chat = {"messages": MESSAGES, "temperature": 0.5, "logprobs": True, "top_logprobs": 2, "tools": TOOLS}
    validator("ChatCompletionRequest").validate(chat)
    validator("CompletionRequest").validate({"prompt": [[1, 2], [3]], "logprobs": 3, "echo": False})
    with pytest.raises(jsonschema.ValidationError):
        validator("ChatCompletionRequest").validate({"messages": MESSAGES, "top_logprobs": 21})


def test_real_responses_match_the_document(client, engine, tok):
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    engine.script(Script(ids(tok, "Hello there")), Script(ids(tok, call)), Script(ids(tok, "Hi"), chunk=2))
    engine.script(Script(ids(tok, "Hello")), Script(ids(tok, "Hello"), chunk=2))
    chat = client.simulate_post(
        "/v1/chat/completions", json={"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}
    )
    validator("ChatCompletion").validate(chat.json)
    tools = client.simulate_post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS})
    assert tools.json["choices"][0]["message"]["tool_calls"]
    validator("ChatCompletion").validate(tools.json)
    stream = client.simulate_post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "stream": True, "logprobs": True, "stream_options": {"include_usage": True}},
    )
    for chunk in sse_payloads(stream.text)[:-1]:
        validator("ChatCompletionChunk").validate(chunk)
    text = client.simulate_post("/v1/completions", json={"prompt": "x", "logprobs": 2})
    validator("Completion").validate(text.json)
    streamed = client.simulate_post("/v1/completions", json={"prompt": "x", "stream": True, "logprobs": 1})
    for chunk in sse_payloads(streamed.text)[:-1]:
        validator("Completion").validate(chunk)
    validator("ModelList").validate(client.simulate_get("/v1/models").json)
    validator("Status").validate(client.simulate_get("/v1/mlx/status").json)
    validator("Liveness").validate(client.simulate_get("/health").json)
    validator("Readiness").validate(client.simulate_get("/health/ready").json)
    validator("ErrorResponse").validate(client.simulate_post("/v1/completions", json={}).json)


def test_every_route_and_method_is_in_the_document():
    paths = openapi_document()["paths"]
    for uri_template, resource in ROUTES.items():
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", uri_template)
        assert path in paths, uri_template
        methods = {name.removeprefix("on_") for name in dir(resource) if name.startswith("on_")}
        assert methods and methods == set(paths[path]) - {"parameters"}, (uri_template, methods)


def test_streamed_events_are_declared_as_events_of_chunks(client, engine, tok):
    """text/event-stream's schema describes each event (OpenAPI 3.1): data is [DONE] or a chunk's JSON."""
    doc = openapi_document()
    engine.script(Script(ids(tok, "Hello")))
    stream = client.simulate_post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    event_schema = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    data = event_schema["schema"]["properties"]["data"]["anyOf"]
    assert data[0] == {"const": "[DONE]"}
    payload = data[1]["contentSchema"]
    assert payload["anyOf"][0] == {"$ref": "#/components/schemas/ChatCompletionChunk"}
    events = sse_payloads(stream.text)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        validator("ChatCompletionChunk").validate(event)
