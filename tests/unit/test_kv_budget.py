"""KV bytes per token against real caches, the budget rule, and admission by KV budget
with the real Scheduler and BatchGenerator on a tiny llama."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from bench.kv_table import MODELS, kv_budget, streams
from engine.core import Scheduler, SchedulerConfig
from engine.kv_budget import KV_STEP_TOKENS, KvLedger, padded
from engine.kv_memory import (
    KV_HEADROOM_MIN_BYTES,
    KvShape,
    derive_budget,
    kv_shape,
    model_bytes_per_token,
    resolve_budget,
)
from ipc.messages import Generate, SamplingParams
from tests.unit.defaults import ENGINE_LIMITS
from tests.unit.random_llama import random_llama

VOCAB = 300
MAX_STEPS = 2000  # every loop below is bounded
# 2 layers x 1 KV head x (key + value) x head size 64 x 4 bytes (float32 weights).
BPT = 2 * 1 * 2 * 64 * 4
PROMPT, MAX_TOKENS = 200, 40  # one row: padded to 256 tokens
ROW = KV_STEP_TOKENS * BPT


def make_model(layers: int = 2) -> llama.Model:
    return random_llama(vocab=VOCAB, hidden=128, layers=layers, heads=2, kv_heads=1, context=1024)


@pytest.fixture(scope="module")
def model() -> llama.Model:
    return make_model()


def scheduler(model, budget: int, **overrides) -> Scheduler:
    limits = {**ENGINE_LIMITS, "kv_cache_budget_bytes": budget, **overrides}
    return Scheduler(model, SchedulerConfig(eos_token_ids=(1,), vocab_size=VOCAB, context_length=1024, **limits))


def gen(rid: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> Generate:
    # Never stops on EOS: every request runs to max_tokens, so the test knows its length.
    return Generate(
        request_id=rid,
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0),
        stop_token_ids=[],
    )


def prompt(i: int, n: int = PROMPT) -> list[int]:
    return [2 + (i * 7 + j) % (VOCAB - 2) for j in range(n)]


def cache_bytes(model, cache: list) -> int:
    model(mx.array([prompt(0, KV_STEP_TOKENS)]), cache=cache)
    mx.eval([c.state for c in cache])
    return sum(c.nbytes for c in cache)


# ---------------------------------------------------------------- bytes per token


def test_bytes_per_token_is_what_mlx_lm_caches_hold(model):
    assert model_bytes_per_token(model) == BPT
    # A whole step of tokens: no partly filled buffer in the figure.
    assert cache_bytes(model, [KVCache() for _ in model.layers]) == KV_STEP_TOKENS * BPT


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bytes_per_token_is_what_quantized_caches_hold(model, bits):
    held = cache_bytes(model, [QuantizedKVCache(group_size=64, bits=bits) for _ in model.layers])
    assert model_bytes_per_token(model, kv_bits=bits, kv_group_size=64) == held // KV_STEP_TOKENS
    # Elements at bits/8 bytes, plus a scale and a bias (float32 here) per group of 64.
    assert held // KV_STEP_TOKENS == 2 * 1 * 2 * (64 * bits // 8 + 2 * 4)


def test_a_shard_with_fewer_layers_counts_the_whole_model():
    """Every rank of a pipeline-sharded engine holds some layers; all count the same."""
    shard = make_model()
    shard.model.layers = shard.model.layers[:1]
    assert len(shard.layers) == 1
    assert model_bytes_per_token(shard) == BPT
    assert cache_bytes(shard, [KVCache()]) == KV_STEP_TOKENS * BPT // 2


def test_llama_shapes_of_the_benchmarks_table():
    llama_8b = KvShape(layers=32, kv_heads=8, head_dim=128, dtype_bytes=2)
    assert llama_8b.bytes_per_token() == 131072  # 128 KiB
    assert llama_8b.bytes_per_token(kv_bits=8) == 69632  # 0.53 x
    assert llama_8b.bytes_per_token(kv_bits=4) == 36864


def test_kv_shape_reads_head_size_from_hidden_size_when_absent(model):
    assert kv_shape(model) == KvShape(layers=2, kv_heads=1, head_dim=64, dtype_bytes=4)


# ---------------------------------------------------------------- the budget rule


def test_derived_budget_is_usable_memory_less_model_and_headroom():
    gib = 1 << 30
    derived = derive_budget(usable=40 * gib, weights=10 * gib)
    assert derived.headroom_bytes == 4 * gib and derived.budget_bytes == 26 * gib
    small = derive_budget(usable=4 * gib, weights=2 * gib)  # 10 % is below the floor
    assert small.headroom_bytes == KV_HEADROOM_MIN_BYTES and small.budget_bytes == 1 * gib
    assert derive_budget(usable=4 * gib, weights=4 * gib).budget_bytes == 0


def test_the_derived_default_on_this_machine_leaves_room_for_kv():
    assert resolve_budget(0, BPT) > 0
    assert resolve_budget(12345, BPT) == 12345


def test_an_engine_left_without_kv_memory_says_so(monkeypatch):
    monkeypatch.setattr("engine.kv_memory.usable_memory", lambda: KV_HEADROOM_MIN_BYTES)
    with pytest.raises(ValueError, match="no memory is left for the KV cache.*kv_cache_budget_bytes"):
        resolve_budget(0, BPT)


# ---------------------------------------------------------------- the ledger


def test_rows_take_the_longest_row_each_in_whole_steps():
    ledger = KvLedger(bytes_per_token=10, budget_bytes=3 * 512 * 10)
    ledger.reserve(1, 100)
    ledger.reserve(2, 300)  # the batch pads every row to this one's 512
    assert ledger.reserved_bytes == 2 * 512 * 10
    assert ledger.cache_room() == 512 * 10
    assert ledger.admissible([50, 50]) == 1  # a third row fits, a fourth does not
    assert ledger.admissible([600, 50]) == 0  # the first that does not fit stops the rest
    assert ledger.admissible([50, 50], without=[2]) == 2
    ledger.release(2)
    assert ledger.reserved_bytes == padded(100) * 10 == 256 * 10


# ---------------------------------------------------------------- admission


def run(s: Scheduler, on_step=None) -> dict[str, dict]:
    """Step until idle as the socket loop does; tokens, finals and the step of each token."""
    results: dict[str, dict] = {}
    for step in range(MAX_STEPS):
        if not s.has_work():
            return results
        for deltas in s.step().values():
            for d in deltas:
                r = results.setdefault(d.request_id, {"tokens": [], "finals": [], "steps": []})
                r["tokens"] += d.token_ids
                r["steps"] += [step] * len(d.token_ids)
                if d.finish_reason:
                    r["finals"].append(d)
        s.remember_finished()
        if on_step is not None:
            on_step(s)
    raise AssertionError("scheduler did not go idle")


def test_a_flood_of_long_prompts_waits_for_memory_and_all_complete_in_order(model):
    s = scheduler(model, budget=2 * ROW)  # room for two rows at a time
    ids = [f"r{i}" for i in range(6)]
    for i, rid in enumerate(ids):
        s.add(b"w", gen(rid, prompt(i)))
    assert s.queued == 6
    seen = {"rows": 0}

    def check(s: Scheduler) -> None:
        assert s.kv_reserved_bytes <= s.kv_budget_bytes
        seen["rows"] = max(seen["rows"], len(s.core.kv))

    results = run(s, check)
    assert [[f.finish_reason for f in results[rid]["finals"]] for rid in ids] == [["length"]] * 6
    assert all(len(results[rid]["tokens"]) == MAX_TOKENS for rid in ids)
    assert seen["rows"] == 2
    first_token = [results[rid]["steps"][0] for rid in ids]
    assert first_token == sorted(first_token)  # admitted in arrival order
    assert first_token[2] > results["r0"]["steps"][-1]  # the third waited for the first two to end
    # While the others waited, the running ones got a token at every step: the
    # first with the step that prefilled the row, then (BatchGenerator returning
    # that one itself a step later, dropped as a repeat) one a step from the second on.
    for rid in ids:
        steps = results[rid]["steps"]
        assert steps[1:] == list(range(steps[1], steps[1] + MAX_TOKENS - 1))
        assert steps[1] == steps[0] + 2
    assert s.kv_reserved_bytes == 0 and s.queued == 0


def test_waiting_for_memory_counts_as_queued_and_beyond_the_bound_is_overloaded(model):
    s = scheduler(model, budget=ROW, max_queued_requests=3)
    s.add(b"w", gen("r0", prompt(0)))
    for _ in range(MAX_STEPS):  # until r0 decodes: it takes the whole budget
        if s.queued == 0:
            break
        s.step()
    for i in range(1, 6):
        s.add(b"w", gen(f"r{i}", prompt(i)))
    assert s.queued == 3
    s.add(b"w", gen("big", prompt(9, 300)))  # no retry would help it: told so, not 429
    results = run(s)
    reasons = {rid: [f.finish_reason for f in r["finals"]] for rid, r in results.items()}
    assert reasons == {
        "r0": ["length"],
        "r1": ["length"],
        "r2": ["length"],
        "r3": ["length"],
        "r4": ["overloaded"],
        "r5": ["overloaded"],
        "big": ["too_large"],
    }


def test_a_request_no_budget_can_hold_is_refused_at_once_with_its_numbers(model):
    s = scheduler(model, budget=ROW)
    s.add(b"w", gen("big", prompt(0, 300), max_tokens=10))  # 310 tokens: two steps of 256
    s.add(b"w", gen("fits", prompt(1)))
    results = run(s)
    (final,) = results["big"]["finals"]
    assert final.finish_reason == "too_large" and not results["big"]["tokens"]
    assert "prompt (300 tokens) + max_tokens (10)" in final.error
    assert f"{BPT} bytes per token" in final.error and "kv_cache_budget_bytes" in final.error
    assert [f.finish_reason for f in results["fits"]["finals"]] == ["length"]


def test_the_prefix_cache_yields_its_memory_to_admit_requests(model):
    s = scheduler(model, budget=2 * ROW)
    s.add(b"w", gen("warm", prompt(0)))
    results = run(s)
    assert results["warm"]["finals"][0].finish_reason == "length"
    assert s.prefix_cache_bytes == (PROMPT + MAX_TOKENS) * BPT  # the finished sequence, cached
    s.add(b"w", gen("a", prompt(1)))
    s.add(b"w", gen("b", prompt(2)))
    s.step()  # both fit only once the cache has given up its entry
    assert len(s.core.kv) == 2  # both in the batch
    assert s.prefix_cache_bytes == 0 and s.prefix_cache_entries == 0
    results = run(s)
    assert [results[r]["finals"][0].finish_reason for r in ("a", "b")] == ["length", "length"]


def test_a_cached_prefix_is_reused_while_the_budget_leaves_it_room(model):
    s = scheduler(model, budget=4 * ROW)
    s.add(b"w", gen("warm", prompt(0)))
    run(s)
    s.add(b"w", gen("again", prompt(0) + [7, 8, 9], max_tokens=5))
    results = run(s)
    assert results["again"]["finals"][0].finish_reason == "length"
    assert s.stats.prompt_cache_hits == 1 and s.stats.prompt_cache_hit_tokens >= PROMPT


def test_the_benchmarks_table_counts_streams_as_admission_does():
    """bench.kv_table's streams x context are what the ledger would admit."""
    for shape in MODELS:
        budget = kv_budget(64, shape.weights_4bit)
        for bits in (None, 8, 4):
            bpt = shape.shape.bytes_per_token(bits)
            for context in (4096, 32768):
                ledger = KvLedger(bpt, budget)
                assert ledger.admissible([context] * 1000) == streams(budget, bpt, context)
    assert kv_budget(16, MODELS[1].weights_4bit) < 0  # 70B 4-bit does not fit 16 GB


def test_a_quantized_bfloat16_model_counts_its_scales_dtype():
    """4-bit weights are integers; keys and values come out in the scales' dtype."""
    quantized = make_model()
    quantized.set_dtype(mx.bfloat16)
    nn.quantize(quantized, group_size=64, bits=4)
    assert kv_shape(quantized).dtype_bytes == 2
    assert model_bytes_per_token(quantized) == BPT // 2
    assert cache_bytes(quantized, [KVCache() for _ in quantized.layers]) == KV_STEP_TOKENS * BPT // 2
