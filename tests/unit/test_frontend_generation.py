"""Stop strings, choice runs and usage counting, without HTTP."""

from __future__ import annotations

import jsonschema
import pytest

from frontend.engine_client import EngineUnavailable
from frontend.errors import APIError
from frontend.generation import ChoiceRun, StopMatcher, choice_sampling, usage_counts
from frontend.tokenization import Tokenization
from ipc.messages import Generate, SamplingParams
from tests.openai_schema import validate, validate_completion_chunk
from tests.unit.fakes import FakeEngineClient, Script


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        text, matched = matcher.feed(piece)
        out += text
        if matched:
            return out, True
    return out + matcher.flush(), False


@pytest.mark.parametrize(
    "pieces, stops, expected",
    [
        (["Hello", " wor", "ld"], ["world"], ("Hello ", True)),
        (["Hel", "lo"], ["lo"], ("Hel", True)),
        (["a", "b", "c"], ["bc", "abx"], ("a", True)),
        (["abx"], ["bc", "abx"], ("", True)),
        (["ab", "xd"], ["b", "abxd"], ("a", True)),  # earliest match wins
        (["S", "T", "O"], ["STOP"], ("STO", False)),  # a prefix at the end is released
        (["no stop here"], [], ("no stop here", False)),
        (["ééé", "ﬁn"], ["éﬁ"], ("éé", True)),
        (["x\n\n", "\ny"], ["\n\n\n"], ("x", True)),
    ],
)
def test_stop_matcher(pieces, stops, expected):
    assert feed_all(StopMatcher(stops), pieces) == expected


def test_stop_matcher_holds_only_possible_prefixes():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("xx ST") == ("xx ", False)
    assert matcher.feed("AR") == ("STAR", False)


def _run(engine: FakeEngineClient, tok: Tokenization, script: Script, stops=(), max_tokens=100) -> ChoiceRun:
    engine.script(script)
    stream = engine.submit(
        Generate(request_id=f"r{len(engine.submitted)}", prompt_token_ids=[1], max_tokens=max_tokens)
    )
    return ChoiceRun(0, stream, tok.detokenizer(), stops)


def test_choice_run_counts_and_finishes(tok):
    engine = FakeEngineClient()
    tokens = tok.hf.encode("Hello world!", add_special_tokens=False)
    run = _run(engine, tok, Script(tokens, chunk=2, cached_prompt_tokens=1))
    assert run.text() == "Hello world!"
    assert (run.finish_reason, run.completion_tokens, run.cached_tokens) == ("stop", len(tokens), 1)


def test_choice_run_multibyte_characters_split_across_tokens(tok):
    engine = FakeEngineClient()
    text = "Café 🙂 你好"
    tokens = tok.hf.encode(text, add_special_tokens=False)
    run = _run(engine, tok, Script(tokens))
    pieces = list(run.pieces())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_choice_run_failures(tok):
    engine = FakeEngineClient()
    with pytest.raises(APIError) as info:
        _run(engine, tok, Script([5], finish_reason="error", error="oom")).text()
    assert info.value.status == 500 and "oom" in info.value.message
    with pytest.raises(EngineUnavailable):
        _run(engine, tok, Script([5, 6, 7], fail_after=1)).text()
    with pytest.raises(EngineUnavailable):  # an abort we did not ask for
        _run(engine, tok, Script([5], finish_reason="abort")).text()


def test_usage_counts_prompt_once_per_group(tok):
    engine = FakeEngineClient()
    runs = [_run(engine, tok, Script([5, 6], cached_prompt_tokens=c)) for c in (3, 9, 4)]
    runs[1].prompt_group = 0
    runs[2].prompt_group = 1
    for run in runs:
        run.text()
    assert usage_counts([10, 20], runs) == (30, 6, 3 + 4)


def test_choice_sampling_seeds():
    base = SamplingParams(seed=2**64 - 1)
    assert choice_sampling(base, 0) is base
    assert choice_sampling(base, 1).seed == 0
    assert choice_sampling(SamplingParams(), 3).seed is None


def test_schema_helper_rejects_wrong_shapes():
    """The positive validations elsewhere mean something only if this fails."""
    with pytest.raises(jsonschema.ValidationError):
        validate({"error": {"message": "m", "type": "t"}}, "ErrorResponse")
    with pytest.raises(jsonschema.ValidationError):
        validate({"object": "list", "data": [{"id": "m", "object": "model"}]}, "ListModelsResponse")
    chunk = {
        "id": "c",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}],
        "usage": None,
    }
    validate_completion_chunk(chunk)
    with pytest.raises(jsonschema.ValidationError):
        validate(chunk, "CreateCompletionResponse")  # the document itself has no nulls here
    chunk["choices"][0]["finish_reason"] = "bogus"
    with pytest.raises(jsonschema.ValidationError):
        validate_completion_chunk(chunk)
    with pytest.raises(jsonschema.ValidationError):
        validate(
            {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0}]},
            "CreateChatCompletionStreamResponse",
        )
