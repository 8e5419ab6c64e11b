"""logprobs / top_logprobs in OpenAI's shapes, against a fake engine."""

from __future__ import annotations

import pytest

from frontend.generation import ChoiceRun
from frontend.tokenization import Tokenization, token_display
from ipc.messages import Generate
from tests.openai_schema import validate, validate_completion_chunk
from tests.unit import fakes
from tests.unit.fakes import FakeEngineClient, Script, fake_logprob
from tests.unit.test_frontend_chat import sse_payloads

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hello world!"}]


def ids(tok: Tokenization, text: str) -> list[int]:
    return tok.hf.encode(text, add_special_tokens=False)


def chat(client, **body):
    return client.simulate_post(CHAT, json={"messages": MESSAGES, **body})


def joined_bytes(entries: list[dict]) -> bytes:
    return b"".join(bytes(e["bytes"]) for e in entries)


# ---------------------------------------------------------------- tokens


def test_token_bytes_rebuild_the_text(tok):
    text = "Café 🙂 你好 hello <|im_end|>"
    token_ids = ids(tok, text)
    assert b"".join(tok.token_bytes(t) for t in token_ids) == text.encode()
    # Byte tokens that end inside a character have no text of their own.
    partial = [t for t in token_ids if not _is_utf8(tok.token_bytes(t))]
    assert partial, "the corpus should split some character across tokens"
    assert all(tok.token_entry(t)[0].startswith("bytes:\\x") for t in partial)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_token_display():
    assert token_display(b" hi") == " hi"
    assert token_display(b"\xf0\x9f") == "bytes:\\xf0\\x9f"


# ---------------------------------------------------------------- chat


def test_chat_logprobs_with_top(client, engine, tok):
    text = "Paris is the capital of France."
    token_ids = ids(tok, text)
    engine.script(Script(token_ids))
    result = chat(client, logprobs=True, top_logprobs=3)
    assert result.status_code == 200, result.text
    body = result.json
    validate(body, "CreateChatCompletionResponse")
    assert engine.submitted[0].logprobs == 3
    content = body["choices"][0]["logprobs"]["content"]
    assert body["choices"][0]["logprobs"]["refusal"] is None
    assert [e["token"] for e in content] == [tok.token_entry(t)[0] for t in token_ids]
    assert joined_bytes(content) == text.encode()
    assert [e["logprob"] for e in content] == [fake_logprob(i) for i in range(len(token_ids))]
    for e, t in zip(content, token_ids):
        assert len(e["top_logprobs"]) == 3
        assert e["top_logprobs"][0] == {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}
        assert e["top_logprobs"][1]["token"] == tok.token_entry(t + 1)[0]


def test_chat_logprobs_without_top(client, engine, tok):
    engine.script(Script(ids(tok, "Hello there")))
    body = chat(client, logprobs=True).json
    validate(body, "CreateChatCompletionResponse")
    assert engine.submitted[0].logprobs == 0
    assert all(e["top_logprobs"] == [] for e in body["choices"][0]["logprobs"]["content"])


@pytest.mark.parametrize("extra", [{}, {"logprobs": False}, {"logprobs": False, "top_logprobs": None}])
def test_chat_no_logprobs(client, engine, extra):
    body = chat(client, **extra).json
    assert body["choices"][0]["logprobs"] is None
    assert engine.submitted[0].logprobs is None


def test_chat_stream_logprobs_per_chunk(client, engine, tok):
    text = "Café 🙂 is the capital of France."
    token_ids = ids(tok, text)
    engine.script(Script(token_ids, chunk=3))
    result = chat(client, logprobs=True, top_logprobs=2, stream=True)
    payloads = sse_payloads(result.text)
    assert payloads[-1] == "[DONE]"
    entries = []
    for chunk in payloads[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
        choice = chunk["choices"][0]
        if "content" in choice["delta"] and choice["delta"]["content"]:
            assert choice["logprobs"] is not None
            piece = joined_bytes(choice["logprobs"]["content"])
            # Each chunk carries the tokens whose text it completes.
            assert piece.decode() == choice["delta"]["content"]
            entries += choice["logprobs"]["content"]
    assert len(entries) == len(token_ids)
    assert joined_bytes(entries) == text.encode()


def test_chat_logprobs_stop_at_stop_string(client, engine, tok):
    engine.script(Script(ids(tok, "Hello world! Hello there")), Script(ids(tok, "Hello world! Hello there")))
    body = chat(client, logprobs=True, stop="! H").json
    assert body["choices"][0]["message"]["content"] == "Hello world"
    content = body["choices"][0]["logprobs"]["content"]
    got = joined_bytes(content).decode()
    # The tokens up to the one holding the start of the stop string, no more.
    assert got.startswith("Hello world") and "there" not in got
    result = chat(client, logprobs=True, stop="! H", stream=True)
    streamed = [
        e
        for chunk in sse_payloads(result.text)[:-1]
        if chunk["choices"][0]["logprobs"]
        for e in chunk["choices"][0]["logprobs"]["content"]
    ]
    assert streamed == content


def test_chat_logprobs_with_n(client, engine, tok):
    engine.script(Script(ids(tok, "one")), Script(ids(tok, "two two")))
    body = chat(client, logprobs=True, n=2).json
    validate(body, "CreateChatCompletionResponse")
    by_index = {c["index"]: c for c in body["choices"]}
    assert joined_bytes(by_index[0]["logprobs"]["content"]) == b"one"
    assert joined_bytes(by_index[1]["logprobs"]["content"]) == b"two two"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
    ],
)
def test_chat_logprobs_errors(client, engine, extra, param):
    result = chat(client, **extra)
    assert result.status_code == 400, result.text
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["param"] == param
    assert engine.submitted == []


# ---------------------------------------------------------------- completions


def test_completion_logprobs(client, engine, tok):
    text = " jumps over the lazy dog 🙂"
    token_ids = ids(tok, text)
    engine.script(Script(token_ids))
    result = client.simulate_post(COMPLETIONS, json={"prompt": "The quick brown fox", "logprobs": 2})
    assert result.status_code == 200, result.text
    body = result.json
    validate(body, "CreateCompletionResponse")
    assert engine.submitted[0].logprobs == 2
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    n = len(token_ids)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"] == [fake_logprob(i) for i in range(n)]
    assert all(len(top) <= 2 and lp["tokens"][i] in top for i, top in enumerate(lp["top_logprobs"]))
    # Offsets index the returned text, which keeps the first token's leading space.
    out = choice["text"]
    assert out == text
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    whole = [t for t in lp["tokens"] if not t.startswith("bytes:")]
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        if token in whole and offset > 0:
            assert out[offset : offset + len(token)] == token


def test_completion_logprobs_zero_and_stream(client, engine, tok):
    token_ids = ids(tok, "Hello world! Hello there")
    engine.script(Script(token_ids, chunk=2), Script(token_ids, chunk=2))
    body = client.simulate_post(COMPLETIONS, json={"prompt": "x", "logprobs": 0}).json
    lp = body["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{}] * len(token_ids)
    result = client.simulate_post(COMPLETIONS, json={"prompt": "x", "logprobs": 0, "stream": True})
    payloads = sse_payloads(result.text)
    tokens, offsets = [], []
    for chunk in payloads[:-1]:
        validate_completion_chunk(chunk)
        if chunk["choices"][0]["logprobs"]:
            tokens += chunk["choices"][0]["logprobs"]["tokens"]
            offsets += chunk["choices"][0]["logprobs"]["text_offset"]
    assert tokens == lp["tokens"] and offsets == lp["text_offset"]


@pytest.mark.parametrize(
    "extra, status, code",
    [
        ({"logprobs": 6}, 400, None),
        ({"logprobs": -1}, 400, None),
        ({"logprobs": 1, "echo": True}, 400, "unsupported_parameter"),
        ({"logprobs": True}, 400, None),  # strict: a bool is not a count
    ],
)
def test_completion_logprobs_errors(client, engine, extra, status, code):
    result = client.simulate_post(COMPLETIONS, json={"prompt": "x", **extra})
    assert result.status_code == status, result.text
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["param"] == "logprobs"
    assert result.json["error"]["code"] == code
    assert engine.submitted == []


# ---------------------------------------------------------------- the run itself


def test_choice_run_releases_held_tokens_with_their_text(tok):
    """A token that ends inside a character is held until the character is whole."""
    engine = FakeEngineClient()
    token_ids = ids(tok, "🙂🚀")
    engine.script(Script(token_ids))
    stream = engine.submit(Generate(request_id="r", prompt_token_ids=[1], max_tokens=50, logprobs=0))
    parts = list(ChoiceRun(0, stream, tok.detokenizer(), (), logprobs=True).parts())
    assert "".join(p.text for p in parts) == "🙂🚀"
    for part in parts:
        assert b"".join(tok.token_bytes(t.token_id) for t in part.logprobs) == part.text.encode()


def test_tokens_a_grammar_forbids_get_openais_impossible_logprob(client, engine, tok, monkeypatch):
    # A grammar mask leaves -inf logprobs in the top list; JSON has no -Infinity
    # (it was encoded as null, which the chunk schema refuses).
    monkeypatch.setattr(fakes, "fake_top_logprobs", lambda token_id, position, k: [(token_id, float("-inf"))] * k)
    engine.script(Script(ids(tok, "Hello")))
    payloads = sse_payloads(chat(client, stream=True, logprobs=True, top_logprobs=2).text)
    entries = [e for p in payloads[:-1] for c in p["choices"] if c["logprobs"] for e in c["logprobs"]["content"]]
    assert entries and all(top["logprob"] == -9999.0 for e in entries for top in e["top_logprobs"])
    for chunk in payloads[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
    engine.script(Script(ids(tok, "Hello")))
    body = client.simulate_post(COMPLETIONS, json={"prompt": "x", "logprobs": 2}).json
    assert set(body["choices"][0]["logprobs"]["top_logprobs"][0].values()) == {-9999.0}
