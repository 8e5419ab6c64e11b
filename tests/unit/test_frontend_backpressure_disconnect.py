"""429 when the engine's queue is full; a vanished client aborts a non-streaming request."""

from __future__ import annotations

import json
import socket

import falcon.testing

from frontend.app import create_app
from frontend.disconnect import peer_closed
from tests.openai_schema import validate
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, Script

MESSAGES = [{"role": "user", "content": "Hello"}]


def test_engine_overloaded_finish_is_429_with_retry_after(tok):
    engine = FakeEngineClient()
    engine.script(Script([], finish_reason="overloaded", error="300 requests are already waiting"))
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    r = client.simulate_post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 429 and r.headers["Retry-After"]
    validate(r.json, "ErrorResponse")
    assert r.json["error"]["code"] == "rate_limit_exceeded"


def test_engine_too_large_finish_is_400_with_the_engines_numbers(tok):
    engine = FakeEngineClient()
    why = "prompt (900 tokens) + max_tokens (100) need 131.1 MB of KV cache, more than the engine's KV budget"
    engine.script(*[Script([], finish_reason="too_large", error=why)] * 2)
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    r = client.simulate_post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 400, r.text
    validate(r.json, "ErrorResponse")
    assert r.json["error"] == {
        "message": why,
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
    # Streamed, the headers are out before the engine answers: the same error as an event.
    r = client.simulate_post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    errors = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith('data: {"error"')]
    assert [e["error"]["code"] for e in errors] == ["request_too_large"]


def test_peer_closed_sees_eof_but_not_pipelined_bytes():
    a, b = socket.socketpair()
    try:
        assert not peer_closed(a)
        b.sendall(b"GET / HTTP/1.1\r\n")
        assert not peer_closed(a)  # bytes waiting: the client is still there
        a.recv(100)
        b.close()
        assert peer_closed(a)
    finally:
        a.close()


def test_non_streaming_request_of_a_vanished_client_is_aborted(tok):
    engine = FakeEngineClient()
    engine.script(Script(list(range(5, 40)), finish_reason="length"))
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    a, b = socket.socketpair()
    b.close()  # the client hung up before the answer was ready
    try:
        r = client.simulate_post(
            "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 30}, extras={"gunicorn.socket": a}
        )
    finally:
        a.close()
    assert r.status_code == 400 and r.json["error"]["code"] == "client_disconnected"
    assert engine.aborted == [engine.submitted[0].request_id]
