"""response_format (json_object, json_schema) becomes a wire Constraint, against a fake engine."""

from __future__ import annotations

import json

import pytest

from frontend.constraints import JSON_OBJECT
from tests.openai_schema import validate

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Give me JSON"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def chat(client, response_format, **body):
    return client.simulate_post(CHAT, json={"messages": MESSAGES, "response_format": response_format, **body})


def test_text_is_unconstrained(client, engine):
    assert chat(client, {"type": "text"}).status_code == 200
    assert chat(client, None).status_code == 200
    assert [g.constraint for g in engine.submitted] == [None, None]


def test_json_object(client, engine):
    assert chat(client, {"type": "json_object"}, n=2).status_code == 200
    assert [g.constraint for g in engine.submitted] == [JSON_OBJECT, JSON_OBJECT]
    assert json.loads(JSON_OBJECT.text) == {"type": "object"}


def test_json_schema(client, engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    result = chat(client, fmt)
    assert result.status_code == 200, result.text
    validate(result.json, "CreateChatCompletionResponse")
    [request] = engine.submitted
    assert request.constraint.kind == "json_schema"
    assert json.loads(request.constraint.text) == PERSON


def test_json_schema_without_schema_is_any_json(client, engine):
    assert chat(client, {"type": "json_schema", "json_schema": {"name": "anything"}}).status_code == 200
    assert json.loads(engine.submitted[0].constraint.text) == {}


def test_completions_take_response_format_too(client, engine):
    result = client.simulate_post("/v1/completions", json={"prompt": "x", "response_format": {"type": "json_object"}})
    assert result.status_code == 200, result.text
    assert engine.submitted[0].constraint == JSON_OBJECT


@pytest.mark.parametrize(
    "fmt, param, words",
    [
        ({"type": "xml"}, "response_format.type", "json_schema"),
        ({}, "response_format.type", "json_object"),
        ("json", "response_format", "dictionary"),
        ({"type": "json_schema"}, "response_format.json_schema", "object"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format.json_schema.name", "name"),
        (
            {"type": "json_schema", "json_schema": {"name": "a b", "schema": PERSON}},
            "response_format.json_schema.name",
            "",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": "yes"}},
            "response_format.json_schema.strict",
            "boolean",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}},
            "response_format.json_schema.schema",
            "",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}},
            "response_format.json_schema.schema",
            "objekt",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"not": {"type": "string"}}}},
            "response_format.json_schema.schema",
            "not",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/$defs/missing"}}},
            "response_format.json_schema.schema",
            "missing",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "[a-"}}},
            "response_format.json_schema.schema",
            "regex",
        ),
    ],
)
def test_bad_response_format_is_400_naming_it(client, engine, fmt, param, words):
    result = chat(client, fmt)
    assert result.status_code == 400, result.text
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["param"] == param
    assert words in result.json["error"]["message"]
    assert engine.submitted == []
