"""Logprobs computed in the engine, on the tiny random llama of test_engine_core."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from ipc.messages import SamplingParams
from tests.unit import test_engine_core as core
from tests.unit.test_engine_core import gen, make_scheduler


@pytest.fixture(scope="module")
def model():
    return core.model.__wrapped__()  # the same seeded tiny llama as test_engine_core


PROMPT = list(range(5, 30))


def reference(model, prompt: list[int], n: int) -> list[tuple[int, mx.array]]:
    """(token, log-softmax row) of plain greedy generation."""
    out = []
    for (tok, logprobs), _ in zip(generate_step(mx.array(prompt), model), range(n)):
        out.append((int(tok), logprobs))
    return out


def collect_deltas(s) -> dict[str, list]:
    out: dict[str, list] = {}
    for _ in range(500):
        if not s.has_work():
            return out
        for deltas in s.step().values():
            for d in deltas:
                out.setdefault(d.request_id, []).append(d)
    raise AssertionError("scheduler did not go idle")


def test_logprobs_match_log_softmax_and_top_k_is_sorted(model):
    s = make_scheduler(model)
    s.add(b"w", gen("lp", PROMPT, 6, logprobs=5))
    deltas = collect_deltas(s)["lp"]
    expected = reference(model, PROMPT, 6)
    assert [t for d in deltas for t in d.token_ids] == [t for t, _ in expected]
    for d, (token, row) in zip(deltas, expected):
        assert len(d.logprobs) == len(d.token_ids) == len(d.top_logprobs) == 1
        assert math.isclose(d.logprobs[0], row[token].item(), abs_tol=1e-4)
        top = d.top_logprobs[0]
        assert len(top) == 5
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        best = mx.argsort(-row)[:5].tolist()
        assert [i for i, _ in top] == best
        for i, v in top:
            assert math.isclose(v, row[i].item(), abs_tol=1e-4)
        # Greedy: the sampled token is the most likely one.
        assert top[0][0] == token


def test_only_requests_that_ask_get_logprobs(model):
    s = make_scheduler(model)
    s.add(b"w", gen("plain", PROMPT, 4))
    s.add(b"w", gen("zero", PROMPT, 4, logprobs=0))
    s.add(b"w", gen("two", PROMPT, 4, logprobs=2))
    out = collect_deltas(s)
    assert all(d.logprobs is None and d.top_logprobs is None for d in out["plain"])
    assert all(len(d.logprobs) == 1 and d.top_logprobs is None for d in out["zero"])
    assert all(len(d.top_logprobs[0]) == 2 for d in out["two"])
    assert [d.logprobs for d in out["zero"]] == [d.logprobs for d in out["two"]]


def test_masked_tokens_report_the_floor_not_infinity(model):
    # logit_bias -100 pushes tokens far down; a top k larger than what is left
    # still gives finite numbers (JSON has no -inf).
    bias = {i: -100.0 for i in range(1, 300)}
    s = make_scheduler(model)
    s.add(b"w", gen("b", PROMPT, 2, logprobs=20, sampling=SamplingParams(temperature=0.0, logit_bias=bias)))
    for d in collect_deltas(s)["b"]:
        assert d.token_ids == [0]
        assert all(math.isfinite(v) and v >= -9999.0 for _, v in d.top_logprobs[0])


def test_stop_token_carries_no_logprobs(model):
    s = make_scheduler(model)
    seeded = SamplingParams(temperature=1.0, seed=7)
    s.add(b"w", gen("free", PROMPT, 30, sampling=seeded))
    tokens = [t for d in collect_deltas(s)["free"] for t in d.token_ids]
    k = next(i for i in range(1, 30) if tokens[i] not in tokens[:i])
    s.add(b"w", gen("s", PROMPT, 40, logprobs=1, sampling=seeded, stop_token_ids=[tokens[k]]))
    deltas = collect_deltas(s)["s"]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].token_ids == [] and deltas[-1].logprobs is None
    assert [len(d.logprobs) for d in deltas[:-1]] == [1] * k


@pytest.mark.parametrize("k", [-1, 21])
def test_out_of_range_logprobs_rejected(model, k):
    s = make_scheduler(model)
    s.add(b"w", gen("x", PROMPT, 2, logprobs=k))
    [d] = collect_deltas(s)["x"]
    assert d.finish_reason == "error" and "logprobs" in d.error
