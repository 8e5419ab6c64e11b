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

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import CHECKS
from schemathesis.generation.modes import GenerationMode

from tests.integration.server import ServerProcess

# Examples per operation: the generation endpoints get nearly all of them.
GENERATION_CASES = 300
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")
OTHER_CASES = 10
MIN_TOTAL_CASES = 1000
MAX_TOKENS_CAP = 4  # the fuzz is about shapes, not long answers
# Schemathesis stops reading a stream after some events; ours all end (64 choices x 6 events at most).
MAX_STREAM_EVENTS = 1000
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


# Valid bodies as generated rarely stream; half of them are made to (still valid).
STREAMING = [None, None, {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}]


def _streamed(drawn: tuple[schemathesis.Case, dict | None]) -> schemathesis.Case:
    case, fields = drawn
    if fields is not None and isinstance(case.body, dict):
        case.body.update(fields)
    return case


def _cap_tokens(case: schemathesis.Case) -> None:
    if not isinstance(case.body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = case.body.get(key)
        if type(value) is int and value > MAX_TOKENS_CAP:
            case.body[key] = MAX_TOKENS_CAP


# A named-event stream's first and last event: Anthropic's Messages, OpenAI's Responses.
NAMED_STREAM_ENDS = {
    "message_start": ("message_stop",),
    "response.created": ("response.completed", "response.incomplete"),
}


def _check_named_stream(blocks: list[str]) -> None:
    """Each event named by its type, the API's own first and last events, no error event."""
    events = [block.split("\n") for block in blocks]
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert all(json.loads(lines[1].removeprefix("data: "))["type"] == name for name, lines in zip(names, events))
    assert names[-1] in NAMED_STREAM_ENDS[names[0]] and "error" not in names, names


def _check_stream(text: str) -> None:
    """Beyond the declared event schema (schemathesis checks it): the stream ends
    with [DONE] (or, named events, with the response's end), and no event is an
    error (a failure after the headers went out)."""
    blocks = text.split("\n\n")
    assert blocks[-1] == "", text[-200:]
    if blocks[0].startswith("event: "):
        _check_named_stream(blocks[:-1])
        return
    data = [block.removeprefix("data: ") for block in blocks[:-1]]
    assert data and data[-1] == "[DONE]", data[-2:]
    for event in data[:-1]:
        assert "error" not in json.loads(event), event


def test_fuzz_with_own_openapi_document(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    schema.config.max_stream_events = MAX_STREAM_EVENTS  # read every stream to its end
    checks = [check for check in CHECKS.get_all() if check.__name__ not in EXCLUDED]
    seen: Counter = Counter()

    for result in schema.get_all_operations():
        operation = result.ok()
        is_generation = operation.method.upper() == "POST" and operation.path in GENERATION_PATHS
        cases = GENERATION_CASES if is_generation else OTHER_CASES
        positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
        if is_generation:
            positive = st.tuples(positive, st.sampled_from(STREAMING)).map(_streamed)
        strategy = st.one_of(positive, operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

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
            streamed = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
            seen[(operation.label, response.status_code, streamed)] += 1  # noqa: B023 (run() runs in this iteration)
            case.validate_response(response, checks=checks)
            if streamed:
                _check_stream(response.text)

        run()

    print("cases (operation, status, streamed):", dict(seen))
    assert sum(seen.values()) >= MIN_TOTAL_CASES, seen
    for label in (f"POST {path}" for path in GENERATION_PATHS):
        # Generation reached, plain and streamed, and validation refused some.
        assert seen[(label, 200, False)] and seen[(label, 200, True)] and seen[(label, 400, False)], seen
