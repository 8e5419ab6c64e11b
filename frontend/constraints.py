"""What the output must look like: response_format (and forced tool calls) as wire Constraints.

The engine enforces a Constraint with llguidance's grammar mask; this module
decides the grammar and checks it compiles before anything reaches the engine,
so a bad schema is the client's 400, never an engine error. llguidance is
imported here only to validate (no tokenizer, no mlx): milliseconds.
"""

from __future__ import annotations

import json
import re
from typing import Any

import llguidance

from frontend.errors import invalid_request
from ipc.messages import Constraint

# OpenAI: json_schema.name is a-z, A-Z, 0-9, underscores and dashes, at most 64.
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Largest schema accepted (as JSON text); compiled grammars grow with it.
MAX_SCHEMA_CHARS = 256 * 1024

JSON_OBJECT = Constraint(kind="json_schema", text='{"type":"object"}')
# JSON layout inside grammars built here (llguidance's "x-guidance" options):
# json.dumps's separators and no free whitespace, as the engine's default for
# json_schema constraints. Free whitespace lets a model pad forever.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def check_constraint(constraint: Constraint, param: str) -> Constraint:
    """A 400 naming ``param`` unless llguidance can compile the grammar."""
    if len(constraint.text) > MAX_SCHEMA_CHARS:
        raise invalid_request(f"the schema is larger than {MAX_SCHEMA_CHARS} characters", param=param)
    try:
        if constraint.kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(constraint.text)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(constraint.text)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError) as exc:
        raise invalid_request(f"invalid schema: {exc}", param=param) from None
    if is_error:
        raise invalid_request(f"the schema cannot be enforced: {messages[0]}", param=param)
    return constraint


def schema_constraint(schema: Any, param: str) -> Constraint:
    if not isinstance(schema, dict):
        raise invalid_request("a JSON schema must be an object", param=param)
    return check_constraint(Constraint(kind="json_schema", text=json.dumps(schema, separators=(",", ":"))), param)


def response_format_constraint(response_format: dict[str, Any] | None) -> Constraint | None:
    """None for free text; a Constraint for json_object / json_schema; 400 otherwise."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        return _json_schema(response_format.get("json_schema"))
    raise invalid_request(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        param="response_format.type",
    )


def _json_schema(spec: Any) -> Constraint:
    param = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise invalid_request("response_format.json_schema must be an object", param=param)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise invalid_request(
            "response_format.json_schema.name is required: 1-64 letters, digits, underscores or dashes",
            param=f"{param}.name",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_request("response_format.json_schema.strict must be a boolean", param=f"{param}.strict")
    # No schema: any JSON value (OpenAI makes the schema optional). The output
    # is held to the schema whether or not "strict" is set.
    schema = spec.get("schema", {})
    return schema_constraint(schema, f"{param}.schema")
