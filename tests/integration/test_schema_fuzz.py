"""Schema-driven fuzzing (schemathesis) of the real server with its own /openapi.json.

Every operation of the document gets requests generated from its schemas,
valid and invalid ones. Each answer must be declared: its status, its
content type and its body's schema; a streamed answer's every event must
match the declared event schema and the stream must end with [DONE]. No
answer may be a 5xx. Derandomized (the same cases every run) and cheap per
case (max_tokens capped), so the 1,000+ cases take a few minutes at most.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.checks import CHECKS
from schemathesis.generation.modes import GenerationMode

from tests.integration.server import ServerProcess

# Examples per operation: the generation endpoints get nearly all of them.
GENERATION_CASES = 500
OTHER_CASES = 10
MIN_TOTAL_CASES = 1000
MAX_TOKENS_CAP = 4  # the fuzz is about shapes, not long answers
REQUEST_TIMEOUT_S = 30.0  # a hang fails the test instead of blocking it
# Schema-valid requests the server may still refuse (context length, an
# unsupported field value, a tool schema llguidance cannot compile): a 400
# with the error JSON is declared, so that check does not apply.
EXCLUDED = {"positive_data_acceptance"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, server_logs):
    # One worker: the fuzz is serial; an unset max_tokens must stay cheap too.
    with ServerProcess(tiny_model_dir, server_logs, "--default-max-tokens", str(MAX_TOKENS_CAP), workers=1) as s:
        yield s


def _cap_tokens(case: schemathesis.Case) -> None:
    if not isinstance(case.body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(key)
        if type(value) is int and value > MAX_TOKENS_CAP:
            case.body[key] = MAX_TOKENS_CAP


def _stream_validator(document: dict[str, Any], path: str) -> jsonschema.Draft202012Validator:
    schema = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    registry = Registry().with_resource("urn:doc", Resource.from_contents(document, default_specification=DRAFT202012))
    ref = json.dumps(schema).replace('"#/', '"urn:doc#/')
    return jsonschema.Draft202012Validator(json.loads(ref), registry=registry)


def _check_stream(text: str, validator: jsonschema.Draft202012Validator) -> None:
    blocks = text.split("\n\n")
    assert blocks[-1] == "", text[-200:]
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        events.append(block[len("data: ") :])
    assert events and events[-1] == "[DONE]", events[-2:]
    for data in events[:-1]:
        event = json.loads(data)
        assert "error" not in event, event  # a stream that failed after its headers
        validator.validate(event)


def test_fuzz_with_own_openapi_document(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    document = schema.raw_schema
    checks = [check for check in CHECKS.get_all() if check.__name__ not in EXCLUDED]
    seen: Counter = Counter()

    for result in schema.get_all_operations():
        operation = result.ok()
        is_generation = operation.method.upper() == "POST" and "completions" in operation.path
        cases = GENERATION_CASES if is_generation else OTHER_CASES
        stream_validator = _stream_validator(document, operation.path) if is_generation else None
        strategy = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=cases,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: schemathesis.Case) -> None:
            _cap_tokens(case)
            response = case.call(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S)
            seen[(operation.label, response.status_code)] += 1
            case.validate_response(response, checks=checks)
            if stream_validator is not None and response.headers.get("content-type", [""])[0].startswith(
                "text/event-stream"
            ):
                _check_stream(response.text, stream_validator)

        run()

    print("cases (operation, status):", dict(seen))
    assert sum(seen.values()) >= MIN_TOTAL_CASES, seen
    for label in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert seen[(label, 200)] and seen[(label, 400)], seen  # generation reached, validation too
