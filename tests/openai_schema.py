"""Validate response dicts against OpenAI's published OpenAPI schemas.

The document (tests/data/openai/openapi-2.3.0.json) is OpenAPI 3.1, but some
fields still say ``"nullable": true`` the 3.0 way; those are rewritten to
JSON Schema (``type: [T, "null"]``, null allowed in an ``enum``, or
``anyOf: [..., {"type": "null"}]`` next to a ``$ref``) before validating with
Draft 2020-12.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

OPENAPI_PATH = Path(__file__).parent / "data" / "openai" / "openapi-2.3.0.json"
# Any URI works: refs in the document are "#/components/schemas/..." fragments.
_DOC_URI = "urn:openai:openapi"


def _nullable_to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_json_schema(value) for key, value in node.items()}
    if node.pop("nullable", False) is not True:
        return node
    type_ = node.get("type")
    if "$ref" in node or "anyOf" in node or "oneOf" in node or "allOf" in node or type_ is None:
        return {"anyOf": [node, {"type": "null"}]}
    node["type"] = [*type_, "null"] if isinstance(type_, list) else [type_, "null"]
    if "enum" in node and None not in node["enum"]:
        node["enum"] = [*node["enum"], None]
    return node


# The document says completions stream chunks share CreateCompletionResponse's
# shape, but that schema forbids what OpenAI itself streams: finish_reason null
# until the last chunk and usage null (stream_options.include_usage). This
# derived schema allows exactly those two nulls and nothing else.
COMPLETION_CHUNK = "CreateCompletionResponse (stream chunk)"


def _completion_chunk_schema(schemas: dict[str, Any]) -> dict[str, Any]:
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    finish = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    finish["type"] = ["string", "null"]
    finish["enum"] = [*finish["enum"], None]
    chunk["properties"]["usage"] = {"anyOf": [chunk["properties"]["usage"], {"type": "null"}]}
    return chunk


@functools.lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    with open(OPENAPI_PATH, encoding="utf-8") as f:
        doc = _nullable_to_json_schema(json.load(f))
    schemas = doc["components"]["schemas"]
    schemas[COMPLETION_CHUNK] = _completion_chunk_schema(schemas)
    return doc


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    doc = _document()
    if name not in doc["components"]["schemas"]:
        raise KeyError(f"no schema named {name!r} in {OPENAPI_PATH.name}")
    registry = Registry().with_resource(_DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012))
    pointer = name.replace("~", "~0").replace("/", "~1").replace(" ", "%20").replace("(", "%28").replace(")", "%29")
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": f"{_DOC_URI}#/components/schemas/{pointer}",
    }
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless ``instance`` matches the component."""
    _validator(schema_name).validate(copy.deepcopy(instance))


def validate_completion_chunk(chunk: Any) -> None:
    """A /v1/completions stream chunk (see COMPLETION_CHUNK)."""
    validate(chunk, COMPLETION_CHUNK)


def schema(name: str) -> dict[str, Any]:
    return _document()["components"]["schemas"][name]
