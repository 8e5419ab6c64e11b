"""Property-based fuzzing of the real server (hypothesis): no 5xx, OpenAI error JSON on every 4xx, no hang.

Bodies mix plausible and hostile values for every field the API knows, plus
unknown keys and non-JSON bodies. Derandomized and bounded (a few hundred
requests, well under a minute on the tiny model): the same examples every run.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.openai_schema import validate, validate_completion_chunk

REQUEST_TIMEOUT_S = 30.0  # a hang fails the test instead of blocking it
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------- values

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def sometimes(good: st.SearchStrategy) -> st.SearchStrategy:
    """Plausible values (themselves valid or not); bodies() adds arbitrary ones."""
    return good


small_schemas = st.sampled_from(
    [
        {"type": "object"},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]},
        {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        {"enum": ["x", "y"]},
        {"type": "objekt"},
        {"not": {}},
        {"$ref": "#/nowhere"},
        {},
    ]
)
content_parts = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
        st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "weird"]), "x": json_values}),
    ),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": sometimes(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
            "content": sometimes(st.one_of(st.text(max_size=60), content_parts, st.none())),
        },
        optional={
            "tool_calls": st.lists(
                st.fixed_dictionaries(
                    {
                        "id": st.text(max_size=5),
                        "type": st.just("function"),
                        "function": st.fixed_dictionaries(
                            {"name": st.text(max_size=8), "arguments": st.sampled_from(['{"a": 1}', "{", "[]", "1"])}
                        ),
                    }
                ),
                max_size=2,
            ),
            "name": st.text(max_size=8),
        },
    ),
    max_size=4,
)
tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": sometimes(st.just("function")),
            "function": sometimes(
                st.fixed_dictionaries(
                    {"name": sometimes(st.from_regex(r"[a-z_]{1,10}", fullmatch=True))},
                    optional={"parameters": small_schemas, "description": st.text(max_size=20)},
                )
            ),
        }
    ),
    max_size=3,
)
response_formats = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}, {}]),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries(
                {"name": sometimes(st.from_regex(r"[a-z]{1,8}", fullmatch=True))},
                optional={"schema": small_schemas, "strict": st.booleans()},
            ),
        }
    ),
)
common_fields = {
    # Small max_tokens keep each example cheap; the fuzz is about input handling.
    "max_tokens": sometimes(st.integers(min_value=-2, max_value=6)),
    "temperature": sometimes(st.floats(min_value=-1, max_value=3, allow_nan=False)),
    "top_p": sometimes(st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)),
    "top_k": sometimes(st.integers(min_value=-3, max_value=50)),
    "min_p": sometimes(st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)),
    "repetition_penalty": sometimes(st.floats(min_value=-1, max_value=3, allow_nan=False)),
    "presence_penalty": sometimes(st.floats(min_value=-3, max_value=3, allow_nan=False)),
    "frequency_penalty": sometimes(st.floats(min_value=-3, max_value=3, allow_nan=False)),
    "logit_bias": sometimes(
        st.dictionaries(
            st.one_of(st.integers(-5, 2000).map(str), st.text(max_size=4)), st.floats(-150, 150), max_size=3
        )
    ),
    "seed": sometimes(st.integers(min_value=-(2**64), max_value=2**64)),
    "n": sometimes(st.integers(min_value=-1, max_value=20)),
    "stop": sometimes(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6))),
    "stream": sometimes(st.booleans()),
    "stream_options": sometimes(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "user": sometimes(st.text(max_size=10)),
    "response_format": sometimes(response_formats),
    "model": sometimes(st.text(max_size=10)),
}
chat_fields = {
    **common_fields,
    "messages": sometimes(messages),
    "max_completion_tokens": sometimes(st.integers(min_value=-1, max_value=6)),
    "logprobs": sometimes(st.booleans()),
    "top_logprobs": sometimes(st.integers(min_value=-2, max_value=25)),
    "tools": sometimes(tools),
    "tool_choice": sometimes(
        st.one_of(
            st.sampled_from(["none", "auto", "required", "sometimes"]),
            st.fixed_dictionaries(
                {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(max_size=8)})}
            ),
        )
    ),
    "parallel_tool_calls": sometimes(st.booleans()),
    "chat_template_kwargs": sometimes(
        st.dictionaries(st.sampled_from(["enable_thinking", "tokenize", "x"]), json_values, max_size=2)
    ),
    "reasoning_effort": sometimes(st.sampled_from(["low", "high"])),
    "audio": sometimes(st.none()),
    "modalities": sometimes(st.sampled_from([["text"], ["text", "audio"]])),
    "metadata": sometimes(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
}
completion_fields = {
    **common_fields,
    "prompt": sometimes(
        st.one_of(
            st.text(max_size=60),
            st.lists(st.text(max_size=20), max_size=3),
            st.lists(st.integers(-3, 2000), max_size=8),
            st.lists(st.lists(st.integers(0, 700), max_size=5), max_size=3),
        )
    ),
    "echo": sometimes(st.booleans()),
    "logprobs": sometimes(st.integers(min_value=-1, max_value=7)),
    "best_of": sometimes(st.integers(min_value=0, max_value=4)),
    "suffix": sometimes(st.one_of(st.none(), st.text(max_size=5))),
}


@st.composite
def bodies(draw, fields: dict[str, st.SearchStrategy], required: str, good_required: st.SearchStrategy) -> dict:
    """A few fields at a time (most bodies get past validation), each
    plausible or, one time in five, any JSON at all; sometimes unknown keys."""
    body: dict = {}
    if draw(st.integers(0, 9)) < 9:
        body[required] = draw(good_required if draw(st.booleans()) else fields[required])
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        body[key] = draw(json_values if draw(st.integers(0, 4)) == 0 else fields[key])
    body.update(draw(st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=1)))
    if draw(st.integers(0, 2)) == 0:
        body["stream"] = True
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = draw(st.integers(1, 8))  # the default (rest of the context) is slow here
    return body


good_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=40)}),
    min_size=1,
    max_size=3,
)
good_prompts = st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(3, 600), min_size=1, max_size=8))


raw_bodies = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", b"{", b"[]", b"null", b'"x"', b"1", b'{"messages": ', b"\xff\xfe"]),
    json_values.map(lambda v: json.dumps(v).encode()),
)

# ---------------------------------------------------------------- checks


def check(response: httpx.Response, events: list, kind: str, seen: Counter) -> None:
    status = response.status_code
    seen[(status, bool(events))] += 1
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        body = response.json()
        validate(body, "ErrorResponse")
        assert body["error"]["type"] == "invalid_request_error", body
        return
    assert status == 200
    if response.headers["content-type"].startswith("text/event-stream"):
        assert events and events[-1] == "[DONE]", events[-3:]
        for event in events[:-1]:
            assert "error" not in event, event
            if kind == "chat":
                validate(event, "CreateChatCompletionStreamResponse")
            elif event["choices"]:
                validate_completion_chunk(event)
        return
    body = response.json()
    validate(body, "CreateChatCompletionResponse" if kind == "chat" else "CreateCompletionResponse")


def post(base: str, path: str, *, json_body=None, content=None) -> tuple[httpx.Response, list]:
    kwargs = (
        {"json": json_body}
        if content is None
        else {"content": content, "headers": {"content-type": "application/json"}}
    )
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        with client.stream("POST", f"{base}{path}", **kwargs) as response:
            events: list = []
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: ") :]
                        events.append(data if data == "[DONE]" else json.loads(data))
            else:
                response.read()
    return response, events


def test_fuzz_chat_completions(base):
    seen: Counter = Counter()

    @FUZZ
    @given(bodies(chat_fields, "messages", good_messages))
    def run(body):
        response, events = post(base, "/v1/chat/completions", json_body=body)
        check(response, events, "chat", seen)

    run()
    # The examples reach generation (plain and streamed), not only validation.
    assert seen[(200, False)] and seen[(200, True)] and seen[(400, False)], seen
    print("statuses (code, streamed):", dict(seen))


def test_fuzz_completions(base):
    seen: Counter = Counter()

    @FUZZ
    @given(bodies(completion_fields, "prompt", good_prompts))
    def run(body):
        response, events = post(base, "/v1/completions", json_body=body)
        check(response, events, "completion", seen)

    run()
    assert seen[(200, False)] and seen[(200, True)] and seen[(400, False)], seen
    print("statuses (code, streamed):", dict(seen))


def test_fuzz_raw_bodies(base):
    @settings(FUZZ, max_examples=40)
    @given(raw_bodies, st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def run(content, path):
        response, events = post(base, path, content=content)
        check(response, events, "chat" if "chat" in path else "completion", Counter())

    run()
    # The server is still healthy afterwards.
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 200
