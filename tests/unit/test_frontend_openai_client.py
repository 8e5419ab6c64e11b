"""The official openai client against the app (fake engine, wsgiref server in a thread)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, Script

openai = pytest.importorskip("openai")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


class _ThreadedServer(WSGIServer):
    daemon_threads = True


@pytest.fixture
def engine() -> FakeEngineClient:
    return FakeEngineClient()


@pytest.fixture
def client(engine: FakeEngineClient, tok: Tokenization) -> Iterator[openai.OpenAI]:
    server = make_server(
        "127.0.0.1",
        0,
        create_app(engine, tok, settings=frontend_settings()),
        server_class=_ThreadedServer,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="unused", max_retries=0)
    finally:
        server.shutdown()
        server.server_close()


def ids(tok: Tokenization, text: str) -> list[int]:
    return tok.hf.encode(text, add_special_tokens=False)


def test_chat(client, engine, tok):
    engine.script(Script(ids(tok, "Paris is the capital of France.")))
    completion = client.chat.completions.create(
        model="whatever", messages=[{"role": "user", "content": "Capital of France?"}], max_completion_tokens=20
    )
    assert completion.choices[0].message.content == "Paris is the capital of France."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_chat_stream_with_usage(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world!")), Script(ids(tok, "Paris")))
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        n=2,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
        usage = chunk.usage or usage
    assert texts == {0: "Hello world!", 1: "Paris"}
    assert usage is not None and usage.completion_tokens == len(ids(tok, "Hello world!")) + len(ids(tok, "Paris"))


def test_completions_stream_with_stop(client, engine, tok):
    engine.script(Script(ids(tok, "The quick brown fox jumps over the lazy dog.")))
    stream = client.completions.create(model="m", prompt="x", stream=True, stop=["fox"])
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "The quick brown "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models(client):
    [model] = client.models.list().data
    assert model.id == "tiny-test-model"


def test_errors_become_client_exceptions(client, engine):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert info.value.body["param"] == "temperature"
    engine.available = False
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503


def test_stream_error_event_raises(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world! Hello there"), fail_after=2))
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError, match="engine is unavailable"):
        for _ in stream:
            pass
