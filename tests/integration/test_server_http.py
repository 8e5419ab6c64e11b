"""The real mlx-server on the tiny model, over HTTP and with the official openai client."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.openai_schema import validate
from tests.sse import sse_events
from tests.waiting import wait_until

CONCURRENT_STREAMS = 32


def idle_status(base: str) -> dict | None:
    status = httpx.get(f"{base}/v1/mlx/status", timeout=10).json()
    return status if status["engine"]["running_requests"] == status["engine"]["queued_requests"] == 0 else None


def wait_idle(base: str) -> dict:
    return wait_until(lambda: idle_status(base), "an idle engine")


def test_models_lists_the_one_model(base, tiny_model_dir):
    body = httpx.get(f"{base}/v1/models").json()
    validate(body, "ListModelsResponse")
    assert [m["id"] for m in body["data"]] == [tiny_model_dir.name]


def test_chat_completion_shape_and_usage(base, no_eos):
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 7, "logit_bias": no_eos},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7


def test_completion_with_string_list_and_token_prompts(base, no_eos):
    for prompt, n_choices in (("once upon", 1), (["a", "b c"], 2), ([5, 6, 7], 1), ([[5, 6], [7]], 2)):
        r = httpx.post(
            f"{base}/v1/completions",
            json={"prompt": prompt, "max_tokens": 3, "logit_bias": no_eos, "model": "anything"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        validate(body, "CreateCompletionResponse")
        assert sorted(c["index"] for c in body["choices"]) == list(range(n_choices))


def test_streaming_chat_chunks_and_usage(base, no_eos):
    payload = {
        "messages": [{"role": "user", "content": "stream please"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": no_eos,
    }
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_openai_client_chat_completions_stream_and_models(client, tiny_model_dir, no_eos):
    assert [m.id for m in client.models.list()] == [tiny_model_dir.name]
    chat = client.chat.completions.create(
        model="whatever", messages=[{"role": "user", "content": "hi"}], max_tokens=5, logit_bias=no_eos
    )
    assert chat.model == tiny_model_dir.name and chat.usage.completion_tokens == 5
    text = client.completions.create(model="x", prompt="abc", max_tokens=4, logit_bias=no_eos)
    assert text.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        stream=True,
        logit_bias=no_eos,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content or len(pieces) > 0


def test_status_reports_model_and_engine(base, tiny_model_dir):
    body = httpx.get(f"{base}/v1/mlx/status").json()
    assert body["model"]["id"] == tiny_model_dir.name
    assert body["engine"]["state"] == "ready"
    for key in ("uptime_s", "running_requests", "queued_requests", "tokens_generated"):
        assert key in body["engine"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/mlx/models/load"),
        ("DELETE", "/v1/mlx/models/some-model"),
        ("POST", "/v1/mlx/models/some-model/reload"),
        ("GET", "/v1/models/some-model"),
    ],
)
def test_removed_endpoints_answer_410(base, method, path):
    r = httpx.request(method, f"{base}{path}", json={})
    assert r.status_code == 410
    validate(r.json(), "ErrorResponse")


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000_000}, "messages"),
    ],
)
def test_invalid_requests_are_4xx_openai_errors(base, payload, param):
    r = httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param


def test_invalid_json_body(base):
    r = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    validate(r.json(), "ErrorResponse")


def test_32_concurrent_streams_all_complete(base, no_eos):
    def one(i: int) -> tuple[int, str]:
        payload = {
            "messages": [{"role": "user", "content": f"client {i}"}],
            "max_tokens": 24,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logit_bias": no_eos,
        }
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=120) as r:
            events = sse_events(r.iter_text())
        assert events[-1] == "[DONE]"
        return events[-2]["usage"]["completion_tokens"], events[-3]["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(CONCURRENT_STREAMS) as pool:
        results = list(pool.map(one, range(CONCURRENT_STREAMS)))
    assert results == [(24, "length")] * CONCURRENT_STREAMS
    wait_idle(base)


def test_client_disconnect_mid_stream_frees_the_slot(base, no_eos):
    wait_idle(base)
    payload = {
        "messages": [{"role": "user", "content": "a very long answer"}],
        "max_tokens": 3000,
        "stream": True,
        "logit_bias": no_eos,
    }
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        busy = httpx.get(f"{base}/v1/mlx/status").json()["engine"]
        assert busy["running_requests"] + busy["queued_requests"] >= 1
    # The connection is closed here, long before 3000 tokens.
    status = wait_idle(base)
    assert status["engine"]["tokens_generated"] > 0


def _listening_sockets(port: int) -> int:
    """Sockets in LISTEN on ``port`` (IPv4), from the kernel's own table."""
    listening = "0A"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == listening)


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balances connections on Linux only")
def test_each_web_worker_listens_on_a_socket_of_its_own(tiny_server):
    # The kernel then spreads new connections evenly over the workers instead of
    # leaving them to whichever worker is awake (frontend.gunicorn_conf.reuse_port).
    assert _listening_sockets(tiny_server.port) == 2  # the fixture's two workers
    # And the whole server still answers on that one port, connection after connection.
    for _ in range(8):
        with httpx.Client(base_url=tiny_server.base_url) as fresh:
            assert fresh.get("/health").status_code == 200
