"""Reasoning apart from the answer: the splitter, marker detection, the pipeline and chat's fields (fake engine)."""

from __future__ import annotations

import falcon.testing
import pytest

from frontend.app import create_app
from frontend.errors import APIError
from frontend.reasoning import ReasoningSplitter, ReasoningTokens, effort_thinking, thinking_switch
from frontend.tokenization import Tokenization
from tests.openai_schema import validate
from tests.thinking_template import QWEN3_THINKING_TEMPLATE, R1_THINKING_TEMPLATE
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, Script, make_model_info, write_tokenizer_dir
from tests.unit.test_frontend_chat import sse_payloads

URL = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]
OUTPUT = "<think>\nThe user says hello.\nGreet back.\n</think>\n\nHello there!"
REASONING = "The user says hello.\nGreet back."
ANSWER = "Hello there!"


def split(pieces: list[str], *, inside: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter("<think>", "</think>", inside=inside)
    reasoning, answer = "", ""
    for piece in pieces:
        r, a = splitter.feed(piece)
        reasoning, answer = reasoning + r, answer + a
    r, a = splitter.flush()
    return reasoning + r, answer + a


# ---------------------------------------------------------------- the splitter


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, len(OUTPUT)])
def test_markers_split_anywhere_give_the_same_parts(size):
    pieces = [OUTPUT[i : i + size] for i in range(0, len(OUTPUT), size)]
    assert split(pieces) == (REASONING, ANSWER)


def test_output_that_starts_inside_reasoning_needs_only_the_end_marker():
    assert split(list("Let me see.\n</think>\n\n42")) == ("", "Let me see.\n</think>\n\n42")
    assert split(list("Let me see.\n</think>\n\n42"), inside=True) == ("Let me see.", "42")


def test_text_that_only_looks_like_a_marker_stays_text():
    assert split(["a <thin", "king> b </think"]) == ("", "a <thinking> b </think")
    assert split(["<think>x <", "/thin"]) == ("x </thin", "")


def test_reasoning_that_never_ends_is_all_reasoning():
    assert split(["<think>\nstill thinking ", "when max_tokens hit\n"]) == ("still thinking when max_tokens hit", "")


def test_inner_whitespace_of_the_reasoning_is_kept():
    assert split(["<think>a\n\n", "b</think>c"]) == ("a\n\nb", "c")


# ---------------------------------------------------------------- reasoning_effort


@pytest.mark.parametrize("effort, on", [("none", False), ("minimal", True), ("low", True), ("high", True)])
def test_reasoning_effort_turns_thinking_on_or_off(effort, on):
    assert effort_thinking(effort, "reasoning_effort") is on


def test_unknown_effort_is_refused():
    with pytest.raises(APIError) as err:
        effort_thinking("extreme", "reasoning_effort")
    assert err.value.status == 400


def test_thinking_switch():
    assert thinking_switch(None, thinks=True, can_toggle=True, param="p") is None
    assert thinking_switch(False, thinks=True, can_toggle=True, param="p") is False
    assert thinking_switch(True, thinks=True, can_toggle=False, param="p") is None  # thinks anyway
    assert thinking_switch(False, thinks=False, can_toggle=False, param="p") is None
    for wanted, thinks in ((False, True), (True, False)):
        with pytest.raises(APIError) as err:
            thinking_switch(wanted, thinks=thinks, can_toggle=False, param="p")
        assert err.value.param == "p"


# ---------------------------------------------------------------- tokenizers and templates


@pytest.fixture(scope="module", params=["added", "special"])
def qwen3(request, tmp_path_factory) -> Tokenization:
    path = write_tokenizer_dir(
        tmp_path_factory.mktemp("qwen3"), chat_template=QWEN3_THINKING_TEMPLATE, think_markers=request.param
    )
    return Tokenization.from_pretrained(path, skip_special_tokens=True)


@pytest.fixture(scope="module")
def r1(tmp_path_factory) -> Tokenization:
    path = write_tokenizer_dir(tmp_path_factory.mktemp("r1"), chat_template=R1_THINKING_TEMPLATE, think_markers="added")
    return Tokenization.from_pretrained(path)


def test_thinking_markers_come_from_the_vocabulary(qwen3, tok):
    assert qwen3.thinking is not None and tok.thinking is None
    assert qwen3.thinking.start == "<think>" and qwen3.thinking.end == "</think>"
    assert qwen3.thinking.start_ids == (qwen3.marker_token_id("<think>"),)
    assert qwen3.can_toggle_thinking and not tok.can_toggle_thinking


def test_where_the_output_starts_follows_the_prompt(qwen3, r1):
    assert not qwen3.thinking.opened_by(qwen3.render_chat(MESSAGES))  # the model opens <think> itself
    assert not qwen3.thinking.opened_by(qwen3.render_chat(MESSAGES, thinking=False))  # closed empty
    assert qwen3.hf.decode(qwen3.render_chat(MESSAGES, thinking=False)).endswith("<think>\n\n</think>\n\n")
    assert r1.thinking.opened_by(r1.render_chat(MESSAGES))
    assert not r1.can_toggle_thinking


# ---------------------------------------------------------------- chat completions


def _client(tok: Tokenization, script: Script) -> tuple[falcon.testing.TestClient, FakeEngineClient]:
    engine = FakeEngineClient()
    engine.default = script
    return falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings())), engine


def _ids(tok: Tokenization, text: str) -> list[int]:
    return tok.encode_prompt(text, add_special_tokens=False)


def _streamed(client: falcon.testing.TestClient, **body: object) -> tuple[str, str, list]:
    result = client.simulate_post(URL, json={"messages": MESSAGES, "stream": True, **body})
    assert result.status_code == 200, result.text
    chunks = [c for c in sse_payloads(result.text) if c != "[DONE]"]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    for delta in deltas:
        assert delta.get("reasoning") == delta.get("reasoning_content")
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    return reasoning, "".join(d.get("content") or "" for d in deltas), chunks


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_chat_answers_with_reasoning_apart(qwen3, chunk):
    ids = _ids(qwen3, OUTPUT)
    client, engine = _client(qwen3, Script(ids, chunk=chunk))
    result = client.simulate_post(URL, json={"messages": MESSAGES, "max_tokens": 100})
    assert result.status_code == 200, result.text
    validate(result.json, "CreateChatCompletionResponse")
    message = result.json["choices"][0]["message"]
    assert (message["reasoning_content"], message["reasoning"], message["content"]) == (REASONING, REASONING, ANSWER)
    assert result.json["usage"]["completion_tokens"] == len(ids)  # reasoning tokens count
    reasoning_tokens = ids.index(qwen3.thinking.end_ids[0]) + 1  # <think> ... </think>
    assert result.json["usage"]["completion_tokens_details"] == {"reasoning_tokens": reasoning_tokens}
    reasoning, answer, chunks = _streamed(client, max_tokens=100, stream_options={"include_usage": True})
    assert (reasoning, answer) == (REASONING, ANSWER)
    assert chunks[-1]["usage"] == result.json["usage"]


def test_no_reasoning_fields_without_reasoning(qwen3):
    client, _ = _client(qwen3, Script(_ids(qwen3, ANSWER)))
    message = client.simulate_post(URL, json={"messages": MESSAGES}).json["choices"][0]["message"]
    assert message["content"] == ANSWER and "reasoning" not in message and "reasoning_content" not in message
    assert client.simulate_post(URL, json={"messages": MESSAGES}).json["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": 0
    }
    _, _, chunks = _streamed(client)
    assert all("reasoning" not in c["choices"][0]["delta"] for c in chunks if c["choices"])


def test_a_template_that_opens_think_starts_the_output_inside_reasoning(r1):
    ids = _ids(r1, "Hmm, a greeting.\n</think>\n\nHi!")
    client, _ = _client(r1, Script(ids))
    result = client.simulate_post(URL, json={"messages": MESSAGES}).json
    message = result["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Hmm, a greeting.", "Hi!")
    assert result["usage"]["completion_tokens_details"]["reasoning_tokens"] == ids.index(r1.thinking.end_ids[0]) + 1


def test_no_token_details_for_a_model_that_does_not_think(client):
    result = client.simulate_post(URL, json={"messages": MESSAGES})
    assert "completion_tokens_details" not in result.json["usage"]


def test_reasoning_tokens_of_markers_in_several_tokens():
    counter = ReasoningTokens((7, 8), (9,), exit_ids=(5,), inside=False)
    counter.feed([1, 7, 8, 2, 3])
    counter.feed([9, 4])
    assert counter.count == 5  # 7 8 2 3 9
    opened = ReasoningTokens((7,), (9,), exit_ids=(5,), inside=True)
    opened.feed([1, 2, 5, 6, 9])
    assert opened.count == 2  # a tool call's start marker ends the reasoning


def test_stop_strings_apply_to_the_answer_only(qwen3):
    client, engine = _client(qwen3, Script(_ids(qwen3, "<think>say Hello then stop</think>Hello there! More")))
    result = client.simulate_post(URL, json={"messages": MESSAGES, "stop": ["there"]})
    message = result.json["choices"][0]
    assert message["message"]["reasoning_content"] == "say Hello then stop"
    assert message["message"]["content"] == "Hello "
    assert message["finish_reason"] == "stop"
    assert engine.aborted  # the rest of the generation was stopped


def test_max_tokens_can_end_the_output_inside_reasoning(qwen3):
    ids = _ids(qwen3, OUTPUT)
    client, _ = _client(qwen3, Script(ids))
    result = client.simulate_post(URL, json={"messages": MESSAGES, "max_tokens": 4})
    choice = result.json["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == ""
    assert REASONING.startswith(choice["message"]["reasoning_content"])
    assert result.json["usage"]["completion_tokens"] == 4
    assert _streamed(client, max_tokens=4)[:2] == (choice["message"]["reasoning_content"], "")


def test_logprobs_cover_every_output_token(qwen3):
    ids = _ids(qwen3, OUTPUT)
    client, _ = _client(qwen3, Script(ids, chunk=2))
    result = client.simulate_post(URL, json={"messages": MESSAGES, "logprobs": True})
    assert len(result.json["choices"][0]["logprobs"]["content"]) == len(ids)


@pytest.mark.parametrize("effort, closed", [("none", True), ("low", False), ("high", False)])
def test_reasoning_effort_reaches_enable_thinking(qwen3, effort, closed):
    client, engine = _client(qwen3, Script(_ids(qwen3, ANSWER)))
    result = client.simulate_post(URL, json={"messages": MESSAGES, "reasoning_effort": effort})
    assert result.status_code == 200, result.text
    prompt = qwen3.hf.decode(engine.submitted[0].prompt_token_ids)
    assert prompt.endswith("<think>\n\n</think>\n\n") is closed


def test_reasoning_effort_none_on_a_template_that_always_thinks_is_refused(r1):
    client, engine = _client(r1, Script(_ids(r1, ANSWER)))
    result = client.simulate_post(URL, json={"messages": MESSAGES, "reasoning_effort": "none"})
    assert result.status_code == 400 and result.json["error"]["param"] == "reasoning_effort"
    assert client.simulate_post(URL, json={"messages": MESSAGES, "reasoning_effort": "high"}).status_code == 200


def test_completions_keep_the_markers(r1):
    client, _ = _client(r1, Script(_ids(r1, OUTPUT)))
    result = client.simulate_post("/v1/completions", json={"prompt": "Hi", "max_tokens": 100})
    assert result.json["choices"][0]["text"] == OUTPUT


def test_a_tool_call_ends_the_reasoning_and_stays_in_the_answer():
    splitter = ReasoningSplitter("<think>", "</think>", inside=True, exits=("<tool_call>",))
    parts = [splitter.feed(c) for c in "I should call it.\n<tool_call>{}</tool_call>"] + [splitter.flush()]
    assert ("".join(r for r, _ in parts), "".join(a for _, a in parts)) == (
        "I should call it.",
        "<tool_call>{}</tool_call>",
    )


def test_chat_tool_call_written_inside_reasoning(r1):
    engine = FakeEngineClient(
        model_info=make_model_info(
            context_length=4096, tool_parser="json_tools", tool_call_start="<tool_call>", tool_call_end="</tool_call>"
        )
    )
    output = 'Need the time.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    engine.default = Script(_ids(r1, output))
    client = falcon.testing.TestClient(create_app(engine, r1, settings=frontend_settings()))
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    result = client.simulate_post(URL, json={"messages": MESSAGES, "tools": tools})
    choice = result.json["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["reasoning_content"] == "Need the time."
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
