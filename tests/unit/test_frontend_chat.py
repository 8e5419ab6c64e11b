"""POST /v1/chat/completions against a fake engine."""

from __future__ import annotations

import json

import falcon.testing
import pytest

from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.openai_schema import validate
from tests.sse import sse_events
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import Script, created_recently, make_model_info, write_tokenizer_dir

URL = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello world!"}]


def ids(tok: Tokenization, text: str) -> list[int]:
    return tok.hf.encode(text, add_special_tokens=False)


def sse_payloads(text: str) -> list:
    """The data of each event; "[DONE]" stays a string."""
    assert text.endswith("\n\n"), text[-50:]
    return sse_events(text)


def post(client: falcon.testing.TestClient, **body: object) -> falcon.testing.Result:
    return client.simulate_post(URL, json={"model": "anything", "messages": MESSAGES, **body})


# ---------------------------------------------------------------- non-streaming


def test_basic_completion(client, engine, tok):
    engine.script(Script(ids(tok, "Paris is the capital of France."), cached_prompt_tokens=3))
    result = post(client, max_tokens=50)
    assert result.status_code == 200, result.text
    body = result.json
    validate(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-test-model"  # the loaded model, whatever was asked
    assert created_recently(body["created"])
    [choice] = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Paris is the capital of France.", "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    [request] = engine.submitted
    expected_prompt = tok.render_chat(MESSAGES)
    assert request.prompt_token_ids == expected_prompt
    assert request.max_tokens == 50
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(expected_prompt)
    assert usage["completion_tokens"] == len(ids(tok, "Paris is the capital of France."))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 3}
    assert engine.all_closed()


def test_length_finish(client, engine, tok):
    tokens = ids(tok, "The quick brown fox jumps over the lazy dog.")
    engine.script(Script(tokens))
    body = post(client, max_tokens=3).json
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["message"]["content"] == tok.decode(tokens[:3])


def test_max_completion_tokens_alias_wins(client, engine):
    post(client, max_tokens=10, max_completion_tokens=7)
    assert engine.submitted[0].max_tokens == 7


def test_default_max_tokens_is_rest_of_context_capped(engine, tok):
    prompt_len = len(tok.render_chat(MESSAGES))
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    post(client)
    assert engine.submitted[-1].max_tokens == 256 - prompt_len  # fake context is 256
    capped = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings(default_max_tokens=10)))
    post(capped)
    assert engine.submitted[-1].max_tokens == 10


def test_sampling_parameters_reach_the_engine(client, engine):
    result = post(
        client,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"5": 10, "7": -100},
        seed=-1,
        user="someone",
        store=False,  # harmless unknown-to-us fields are ignored
        metadata={"a": "b"},
    )
    assert result.status_code == 200, result.text
    sampling = engine.submitted[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p) == (0.5, 0.9, 40, 0.05)
    assert (sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty) == (1.1, 0.5, -0.5)
    assert sampling.logit_bias == {5: 10.0, 7: -100.0}
    assert sampling.seed == 2**64 - 1  # signed OpenAI seed -> unsigned PRNG key


@pytest.mark.parametrize("top_k, wire", [(-1, 0), (0, 0), (511, 511), (512, 0), (426116714, 0)])
def test_top_k_of_the_whole_vocabulary_is_off(client, engine, top_k, wire):
    # The fake vocabulary has 512 tokens; mlx-lm refuses a top_k that keeps them all.
    assert post(client, top_k=top_k).status_code == 200
    assert engine.submitted[0].sampling.top_k == wire


def test_defaults_leave_wire_defaults(client, engine):
    post(client)
    sampling = engine.submitted[0].sampling
    assert sampling.temperature == 1.0 and sampling.seed is None and sampling.logit_bias is None
    assert engine.submitted[0].stop_token_ids is None  # the model's EOS ids


def test_n_choices(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world")), Script(ids(tok, "Hello there")), Script(ids(tok, "Paris")))
    body = post(client, n=3, seed=7).json
    validate(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello world", "Hello there", "Paris"]
    assert [g.sampling.seed for g in engine.submitted] == [7, 8, 9]
    assert len({g.request_id for g in engine.submitted}) == 3
    prompt_len = len(engine.submitted[0].prompt_token_ids)
    completion = sum(len(ids(tok, t)) for t in ("Hello world", "Hello there", "Paris"))
    assert body["usage"]["prompt_tokens"] == prompt_len  # counted once, as OpenAI
    assert body["usage"]["completion_tokens"] == completion


def test_list_content_and_roles(client, engine, tok):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world!"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "again", "name": "bob"},
    ]
    result = client.simulate_post(URL, json={"messages": messages})
    assert result.status_code == 200, result.text
    expected = tok.render_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello world!"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "again", "name": "bob"},
        ]
    )
    assert engine.submitted[0].prompt_token_ids == expected


def test_engine_error_is_500(client, engine):
    engine.script(Script([5, 6], finish_reason="error", error="boom"))
    result = post(client)
    assert result.status_code == 500
    validate(result.json, "ErrorResponse")
    assert "boom" in result.json["error"]["message"]
    assert result.json["error"]["type"] == "server_error"
    assert engine.all_closed()


# ---------------------------------------------------------------- stop strings


@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_stop_string_split_across_tokens(client, engine, tok, chunk):
    tokens = ids(tok, "Hello world! Hello there")
    assert len(tokens) > 3
    engine.script(Script(tokens, chunk=chunk))
    body = post(client, stop=["lo wor", "never"]).json
    assert body["choices"][0]["message"]["content"] == "Hel"
    assert body["choices"][0]["finish_reason"] == "stop"
    rid = engine.submitted[0].request_id
    if chunk < len(tokens):  # closed before the engine's final delta: aborted
        assert ("abort", rid) in engine.events
        assert ("final", rid) not in engine.events


def test_partial_stop_prefix_is_released_at_the_end(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world! STO")))
    body = post(client, stop="STOP").json
    assert body["choices"][0]["message"]["content"] == "Hello world! STO"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_stop_string_streaming(client, engine, tok):
    engine.script(Script(ids(tok, "Paris is the capital of France.")))
    result = post(client, stream=True, stop=["capital"])
    payloads = sse_payloads(result.text)
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-1])
    assert text == "Paris is the "
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
    assert ("abort", engine.submitted[0].request_id) in engine.events


# ---------------------------------------------------------------- streaming


def test_stream_chunk_sequence(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world!"), chunk=1))
    result = post(client, stream=True)
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    payloads = sse_payloads(result.text)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert "usage" not in chunk
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(content) > 1 and "".join(content) == "Hello world!"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert engine.all_closed()


def test_stream_include_usage(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world!"), cached_prompt_tokens=4))
    result = post(client, stream=True, stream_options={"include_usage": True})
    payloads = sse_payloads(result.text)
    assert payloads[-1] == "[DONE]"
    *chunks, usage_chunk = payloads[:-1]
    for chunk in payloads[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == len(ids(tok, "Hello world!"))
    assert usage["prompt_tokens"] == len(engine.submitted[0].prompt_token_ids)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 4


def test_stream_n_choices_have_indexes(client, engine, tok):
    engine.script(Script(ids(tok, "Hello")), Script(ids(tok, "Paris")))
    payloads = sse_payloads(post(client, stream=True, n=2).text)
    by_index: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    for chunk in payloads[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
        [choice] = chunk["choices"]
        by_index[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert by_index == {0: "Hello", 1: "Paris"}
    assert finishes == {0: "stop", 1: "stop"}


def test_stream_engine_dies_midway(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world! Hello there"), fail_after=2))
    result = post(client, stream=True)
    assert result.status_code == 200  # headers were already sent
    payloads = sse_payloads(result.text)
    assert "[DONE]" not in payloads
    validate(payloads[-1], "ErrorResponse")
    assert payloads[-1]["error"]["code"] == "engine_unavailable"
    assert engine.all_closed()


def test_stream_engine_error_event(client, engine):
    engine.script(Script([], finish_reason="error", error="kaput"))
    payloads = sse_payloads(post(client, stream=True).text)
    assert "kaput" in payloads[-1]["error"]["message"]


def _raw_call(app, body: dict):
    env = falcon.testing.create_environ(
        method="POST", path=URL, body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    started = {}

    def start_response(status, headers, exc_info=None):
        started["status"] = status

    return app(env, start_response), started


def test_client_disconnect_aborts(engine, tok):
    engine.script(Script(ids(tok, "The quick brown fox jumps over the lazy dog.")))
    body_iter, started = _raw_call(
        create_app(engine, tok, settings=frontend_settings()), {"messages": MESSAGES, "stream": True}
    )
    assert started["status"].startswith("200")
    it = iter(body_iter)
    next(it), next(it)  # role chunk, first content
    body_iter.close()  # what the WSGI server does when the client goes away
    rid = engine.submitted[0].request_id
    assert ("abort", rid) in engine.events
    assert ("final", rid) not in engine.events


def test_close_before_first_read_aborts(engine, tok):
    body_iter, _ = _raw_call(
        create_app(engine, tok, settings=frontend_settings()), {"messages": MESSAGES, "stream": True, "n": 2}
    )
    body_iter.close()  # a generator never started would not run its finally
    assert [kind for kind, _ in engine.events].count("abort") == 2


# ---------------------------------------------------------------- client errors


def _error(result: falcon.testing.Result, status: int, param: str | None) -> dict:
    assert result.status_code == status, result.text
    validate(result.json, "ErrorResponse")
    error = result.json["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("functions", [{"name": "f"}]),
        ("function_call", {"name": "f"}),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
    ],
)
def test_unsupported_fields(client, engine, field, value):
    error = _error(post(client, **{field: value}), 400, field)
    assert error["code"] == "unsupported_parameter"
    assert engine.submitted == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", False),
        ("response_format", {"type": "text"}),
        ("tools", []),
        ("tool_choice", "none"),
        ("modalities", ["text"]),
    ],
)
def test_harmless_values_of_unsupported_fields(client, field, value):
    assert post(client, **{field: value}).status_code == 200


def test_image_content_part_rejected(client):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}
    ]
    _error(client.simulate_post(URL, json={"messages": messages}), 400, "messages[0].content[1]")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        # Message shapes as OpenAI's schema has them, per role.
        ({"messages": [{"role": "tool"}], "stream": True}, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "system", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant"}, *MESSAGES]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {}}]}]},
            "messages[0].tool_calls[0].function.name",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {}}]}]},
            "messages[0].tool_calls[0].type",
        ),
        ({"messages": MESSAGES, "temperature": 2.5}, "temperature"),
        ({"messages": MESSAGES, "temperature": "0.5"}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "n": 17}, "n"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": MESSAGES, "stop": [""]}, "stop"),
        ({"messages": MESSAGES, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"messages": MESSAGES, "logit_bias": {"1": 101}}, "logit_bias"),
        ({"messages": MESSAGES, "logit_bias": {"100000": 1}}, "logit_bias"),
        ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": MESSAGES, "seed": 2**63}, "seed"),
    ],
)
def test_invalid_requests(client, engine, body, param):
    _error(client.simulate_post(URL, json=body), 400, param)
    assert engine.submitted == []


def test_context_overflow(client, engine, tok):
    prompt_len = len(tok.render_chat(MESSAGES))
    error = _error(post(client, max_tokens=256), 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"] and str(prompt_len) in error["message"]
    assert engine.submitted == []


def test_prompt_alone_overflows(engine, tok):
    engine.model_info = make_model_info(context_length=5)
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    _error(post(client), 400, "messages")


def test_template_error_is_400(engine, tmp_path):
    template = "{{ raise_exception('roles must alternate') }}"
    tok = Tokenization.from_pretrained(write_tokenizer_dir(tmp_path / "t", chat_template=template))
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    error = _error(post(client), 400, "messages")
    assert "roles must alternate" in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'"text"'])
def test_bad_json_body(client, raw):
    result = client.simulate_post(URL, body=raw, headers={"Content-Type": "application/json"})
    _error(result, 400, None)


def test_body_too_large(engine, tok):
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings(max_request_bytes=100)))
    result = post(client, user="x" * 200)
    assert result.status_code == 413
    validate(result.json, "ErrorResponse")


# ---------------------------------------------------------------- engine unavailable


def test_engine_unavailable_is_503(client, engine):
    engine.available = False
    result = post(client)
    assert result.status_code == 503
    assert result.headers["retry-after"] == "5"
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["type"] == "server_error"
    assert result.json["error"]["code"] == "engine_unavailable"


def test_engine_unavailable_streaming_before_start_is_503(client, engine):
    engine.available = False
    assert post(client, stream=True).status_code == 503


def test_partial_submit_failure_closes_submitted(client, engine):
    engine.fail_submit_after = 2
    assert post(client, n=3).status_code == 503
    assert len(engine.submitted) == 2 and engine.all_closed()
    assert len(engine.aborted) == 2


def test_engine_dies_non_streaming_is_503(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world!"), fail_after=1))
    assert post(client).status_code == 503
    assert engine.all_closed()


# ---------------------------------------------------------------- template kwargs and cleanup


def test_chat_template_kwargs_reach_the_template(engine, tmp_path):
    template = "{{ messages[0]['content'] }}|{{ greeting | default('none') }}"
    tok = Tokenization.from_pretrained(write_tokenizer_dir(tmp_path / "t", chat_template=template))
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    assert post(client, chat_template_kwargs={"greeting": "hi"}).status_code == 200
    assert tok.decode(engine.submitted[-1].prompt_token_ids) == "Hello world!|hi"


@pytest.mark.parametrize("key", ["chat_template", "tokenize", "add_generation_prompt", "truncation"])
def test_chat_template_kwargs_cannot_set_renderer_options(client, engine, key):
    _error(post(client, chat_template_kwargs={key: "x"}), 400, "chat_template_kwargs")
    assert engine.submitted == []


def test_streams_closed_if_the_response_fails_after_the_responder(engine, tok):
    """A middleware failing after on_post replaces the SSE body: it must still be closed."""

    class Boom:
        def process_response(self, req, resp, resource, req_succeeded):
            if resp.stream is not None:
                raise RuntimeError("middleware failed")

    app = create_app(engine, tok, settings=frontend_settings())
    app.add_middleware(Boom())
    result = falcon.testing.TestClient(app).simulate_post(URL, json={"messages": MESSAGES, "stream": True})
    assert result.status_code == 500
    assert engine.submitted and engine.all_closed()
    assert ("abort", engine.submitted[0].request_id) in engine.events
