"""Constrained decoding (llguidance) in the scheduler, on the generated tiny model.

The model's weights are random, so whatever it "wants" to write is noise:
the output can only be valid because the mask makes it so.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from mlx_lm import load

from engine.constraints import GrammarCompiler
from engine.core import Scheduler, SchedulerConfig
from ipc.messages import Constraint, Generate, SamplingParams
from tests.unit.defaults import ENGINE_LIMITS

GREEDY = SamplingParams(temperature=0.0)
MAX_STEPS = 2000

# Every string, number and array is bounded, so any path through the schema
# ends well within max_tokens, whatever the model prefers.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "point": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -9, "maximum": 9},
                "y": {"type": "integer", "minimum": 0, "maximum": 999},
            },
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "kind": {"enum": ["circle", "square", None]},
        "label": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
    },
    "required": ["point", "kind", "label"],
    "additionalProperties": False,
}
LIST = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 4}
SCHEMAS = [PERSON, NESTED, LIST, {"type": "string", "pattern": "^[a-c]{2,6}$"}]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tokenizer = load(str(tiny_model_dir))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    return model, tokenizer, config["vocab_size"], sorted(tokenizer.eos_token_ids)


def make_scheduler(loaded, grammars=True) -> Scheduler:
    model, tokenizer, vocab, eos = loaded
    config = SchedulerConfig(eos_token_ids=tuple(eos), vocab_size=vocab, context_length=4096, **ENGINE_LIMITS)
    return Scheduler(model, config, grammars=GrammarCompiler(tokenizer, vocab, eos) if grammars else None)


def constrained(rid: str, schema: dict, prompt: list[int], max_tokens: int = 300, **kw) -> Generate:
    constraint = Constraint(kind="json_schema", text=json.dumps(schema))
    kw.setdefault("sampling", GREEDY)
    return Generate(request_id=rid, prompt_token_ids=prompt, max_tokens=max_tokens, constraint=constraint, **kw)


def run_to_end(s: Scheduler) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for _ in range(MAX_STEPS):
        if not s.has_work():
            return results
        for deltas in s.step().values():
            for d in deltas:
                r = results.setdefault(d.request_id, {"tokens": [], "finish": None, "error": None})
                r["tokens"] += d.token_ids
                if d.finish_reason:
                    r["finish"], r["error"] = d.finish_reason, d.error
    raise AssertionError("scheduler did not go idle")


@pytest.fixture(scope="module")
def prompt(loaded):
    return loaded[1].encode("Answer in JSON please:")


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "nested", "list", "pattern"])
def test_output_validates_greedy_and_sampled(loaded, prompt, schema):
    s = make_scheduler(loaded)
    samplings = [GREEDY] + [SamplingParams(temperature=1.0, seed=seed) for seed in range(4)]
    samplings.append(SamplingParams(temperature=1.5, top_p=0.9, seed=99))
    for i, sampling in enumerate(samplings):
        s.add(b"w", constrained(f"r{i}", schema, prompt, sampling=sampling))
    results = run_to_end(s)  # all of them in one batch
    for rid, r in results.items():
        assert r["finish"] == "stop", (rid, r)
        text = loaded[1].decode(r["tokens"])
        jsonschema.validate(json.loads(text), schema)


def test_eos_is_refused_until_the_json_is_complete(loaded, prompt):
    # The bias makes EOS by far the model's favourite token from the start.
    eos_bias = {t: 100.0 for t in loaded[3]}
    s = make_scheduler(loaded)
    s.add(b"w", constrained("r", PERSON, prompt, sampling=SamplingParams(temperature=0.0, logit_bias=eos_bias)))
    r = run_to_end(s)["r"]
    assert r["finish"] == "stop"
    jsonschema.validate(json.loads(loaded[1].decode(r["tokens"])), PERSON)


def test_json_object(loaded, prompt):
    s = make_scheduler(loaded)
    s.add(b"w", constrained("r", {"type": "object"}, prompt, max_tokens=400))
    r = run_to_end(s)["r"]
    assert r["finish"] == "stop"
    assert isinstance(json.loads(loaded[1].decode(r["tokens"])), dict)


def test_max_tokens_cuts_with_length(loaded, prompt):
    s = make_scheduler(loaded)
    s.add(b"w", constrained("r", PERSON, prompt, max_tokens=5))
    r = run_to_end(s)["r"]
    assert r["finish"] == "length" and len(r["tokens"]) == 5
    assert loaded[1].decode(r["tokens"]).startswith('{"')


def test_lark_grammar(loaded, prompt):
    s = make_scheduler(loaded)
    grammar = (
        'start: "<tool_call>" %json{"type": "object", "properties": {"n": {"enum": [1, 2]}}, '
        '"required": ["n"], "additionalProperties": false, "x-guidance": {"whitespace_flexible": false}} "</tool_call>"'
    )
    request = Generate(
        request_id="r",
        prompt_token_ids=prompt,
        max_tokens=100,
        sampling=GREEDY,
        constraint=Constraint(kind="lark", text=grammar),
    )
    s.add(b"w", request)
    r = run_to_end(s)["r"]
    text = loaded[1].decode(r["tokens"])
    assert r["finish"] == "stop"
    assert text in ('<tool_call>{"n":1}</tool_call>', '<tool_call>{"n":2}</tool_call>')


def test_unconstrained_neighbours_are_unaffected(loaded, prompt):
    plain = Generate(request_id="p", prompt_token_ids=prompt, max_tokens=20, sampling=GREEDY, stop_token_ids=[])
    s = make_scheduler(loaded)
    s.add(b"w", plain)
    alone = run_to_end(s)["p"]["tokens"]
    s = make_scheduler(loaded)
    s.add(b"w", constrained("c", PERSON, prompt))
    s.add(b"w", plain)
    s.add(b"w", constrained("d", LIST, prompt))
    assert run_to_end(s)["p"]["tokens"] == alone


def test_compiled_grammar_is_cached(loaded, prompt):
    s = make_scheduler(loaded)
    for i in range(3):
        s.add(b"w", constrained(f"r{i}", LIST, prompt))
    results = run_to_end(s)
    assert len(s.core._grammars._prototypes) == 1
    assert len({tuple(r["tokens"]) for r in results.values()}) == 1  # greedy: same output, own matchers


@pytest.mark.parametrize(
    "constraint, message",
    [
        (Constraint(kind="json_schema", text='{"type": "objekt"}'), "objekt"),
        (Constraint(kind="json_schema", text="not json"), "json_schema"),
        (Constraint(kind="lark", text="start: (("), "lark"),
    ],
)
def test_bad_grammar_ends_that_request_with_an_error(loaded, prompt, constraint, message):
    s = make_scheduler(loaded)
    s.add(b"w", Generate(request_id="bad", prompt_token_ids=prompt, max_tokens=5, constraint=constraint))
    s.add(b"w", constrained("good", LIST, prompt))
    results = run_to_end(s)
    assert results["bad"]["finish"] == "error" and message in results["bad"]["error"]
    assert results["good"]["finish"] == "stop"


def test_engine_without_grammars_refuses_constraints(loaded, prompt):
    s = make_scheduler(loaded, grammars=False)
    s.add(b"w", constrained("r", LIST, prompt))
    r = run_to_end(s)["r"]
    assert r["finish"] == "error" and "constrained decoding" in r["error"]
