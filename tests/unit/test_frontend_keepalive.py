"""Keep-alives while a stream waits for its first token, on the four streaming APIs
(fake engine whose first delta is late by a number of waits, no clock), and the
official SDKs reading such streams."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import make_server

import falcon.testing
import pytest

from frontend import sse
from frontend.app import create_app
from frontend.tokenization import Tokenization
from frontend.zmq_client import _Stream
from ipc.messages import TokenDelta
from tests.sse import sse_chunks
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, Script
from tests.unit.test_frontend_openai_client import _QuietHandler, _ThreadedServer

KEEP_ALIVE_S = 0.25  # injected; the fake never sleeps, it only records the interval asked for
LATE = 2  # waits that time out before the first delta
USER = [{"role": "user", "content": "hi"}]
COMMENT = sse.KEEPALIVE_COMMENT.decode()
# API -> (path, request body)
APIS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"model": "m", "messages": USER, "stream": True}),
    "completions": ("/v1/completions", {"model": "m", "prompt": "hi", "stream": True}),
    "responses": ("/v1/responses", {"model": "m", "input": "hi", "stream": True, "store": False}),
    "messages": ("/v1/messages", {"model": "m", "max_tokens": 50, "messages": USER, "stream": True}),
}


def ids(tok: Tokenization, text: str) -> list[int]:
    return tok.hf.encode(text, add_special_tokens=False)


@pytest.fixture
def client(engine: FakeEngineClient, tok: Tokenization) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings(keep_alive_s=KEEP_ALIVE_S)))


def events(text: str) -> list[str]:
    """Each SSE event of a body as its raw text (comment lines are events of their own here)."""
    return [block + "\n\n" for block in text.split("\n\n") if block]


def first_text_event(api: str, blocks: list[str]) -> int:
    """The index of the event that carries the first generated text."""
    marks = {
        "chat": '"content":"Hel',
        "completions": '"text":"Hel',
        "responses": "response.output_text.delta",
        "messages": "content_block_delta",
    }
    return next(i for i, block in enumerate(blocks) if marks[api] in block)


@pytest.mark.parametrize("api", sorted(APIS))
def test_a_late_first_token_is_preceded_by_keep_alives(api, client, engine, tok):
    engine.script(Script(ids(tok, "Hello there"), late_waits=LATE))
    path, body = APIS[api]
    result = client.simulate_post(path, json=body)
    assert result.status_code == 200
    blocks = events(result.text)
    if api == "messages":
        # Anthropic's own ping event; one more follows the first content block, as always.
        keep_alive = 'event: ping\ndata: {"type":"ping"}\n\n'
        assert blocks[0].startswith("event: message_start\n")
        assert blocks[1 : 1 + LATE] == [keep_alive] * LATE
        assert blocks.count(keep_alive) == LATE + 1
    else:
        keep_alives = [i for i, block in enumerate(blocks) if block == COMMENT]
        assert len(keep_alives) == LATE
        assert keep_alives == list(range(keep_alives[0], keep_alives[0] + LATE))  # one run of them
        assert max(keep_alives) < first_text_event(api, blocks)
    # Every wait asked for the injected interval, the last one found the delta.
    assert engine.streams[0].wait_timeouts == [KEEP_ALIVE_S] * (LATE + 1)
    assert ("wait", engine.submitted[0].request_id) in engine.events
    assert engine.all_closed() and not engine.aborted


def test_keep_alives_come_per_choice_until_its_first_delta(client, engine, tok):
    engine.script(Script(ids(tok, "one"), late_waits=1), Script(ids(tok, "two"), late_waits=3))
    path, body = APIS["chat"]
    text = client.simulate_post(path, json={**body, "n": 2}).text
    assert text.count(COMMENT) == 4
    contents = {0: "", 1: ""}
    for chunk in sse_chunks(text):
        for choice in chunk["choices"]:
            contents[choice["index"]] += choice["delta"].get("content") or ""
    assert contents == {0: "one", 1: "two"}


def test_a_prompt_token_in_time_sends_no_keep_alive(client, engine, tok):
    engine.script(Script(ids(tok, "Hello")))
    path, body = APIS["chat"]
    assert COMMENT not in client.simulate_post(path, json=body).text


def test_the_body_starts_with_an_empty_chunk_so_headers_go_out_at_once():
    body = sse.SSEBody(iter([b"data: x\n\n"]), [])
    assert list(body) == [b"", b"data: x\n\n"]


def test_keep_alive_interval_must_be_positive():
    with pytest.raises(ValueError, match="keep_alive_s"):
        frontend_settings(keep_alive_s=0)


# ---------------------------------------------------------------- the ZeroMQ client's stream


class _Owner:
    """What a _Stream calls back on its client."""

    def __init__(self) -> None:
        self.forgotten: list[str] = []
        self.aborted: list[str] = []

    def _forget(self, request_id: str) -> None:
        self.forgotten.append(request_id)

    def _abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def test_zmq_stream_wait_keeps_the_delta_for_the_iteration():
    owner = _Owner()
    stream = _Stream(owner, "r1", timeout_s=60.0)  # type: ignore[arg-type]
    assert stream.wait(0.01) is False  # nothing yet: the interval ran out
    stream.put(TokenDelta("r1", [5]))
    stream.put(TokenDelta("r1", [6], "length"))
    assert stream.wait(0.01) is True
    assert stream.wait(0.01) is True  # asking again takes nothing more
    assert [d.token_ids for d in stream] == [[5], [6]]
    assert owner.forgotten == ["r1"] and not owner.aborted
    assert stream.wait(0.01) is True  # ended: iterating would not block


# ---------------------------------------------------------------- official SDKs


@pytest.fixture
def base_url(engine: FakeEngineClient, tok: Tokenization) -> Iterator[str]:
    app = create_app(engine, tok, settings=frontend_settings(keep_alive_s=KEEP_ALIVE_S))
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_openai_sdk_reads_streams_with_keep_alives(base_url, engine, tok):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    engine.script(*(Script(ids(tok, "Hello there"), late_waits=LATE) for _ in range(3)))
    chat = client.chat.completions.create(model="m", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == "Hello there"
    completion = client.completions.create(model="m", prompt="hi", stream=True)
    assert "".join(c.choices[0].text for c in completion if c.choices) == "Hello there"
    response = client.responses.create(model="m", input="hi", stream=True, store=False)
    kinds = [event.type for event in response]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert all(stream.wait_timeouts == [KEEP_ALIVE_S] * (LATE + 1) for stream in engine.streams)


def test_anthropic_sdk_reads_a_stream_with_pings(base_url, engine, tok):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0)
    engine.script(Script(ids(tok, "Hello there"), late_waits=LATE))
    with client.messages.stream(model="m", max_tokens=50, messages=USER) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == "Hello there" and message.content[0].text == "Hello there"
    assert ("wait", engine.submitted[0].request_id) in engine.events


def test_raw_body_of_a_stream_with_keep_alives_is_valid_json_per_data_line(client, engine, tok):
    engine.script(Script(ids(tok, "Hello there"), late_waits=LATE))
    path, body = APIS["responses"]
    for block in events(client.simulate_post(path, json=body).text):
        if block == COMMENT:
            continue
        name, data = block.strip().split("\n")
        assert name.startswith("event: ") and json.loads(data.removeprefix("data: "))["type"] == name[7:]
