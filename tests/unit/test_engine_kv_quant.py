"""The Scheduler with kv_bits: a quantized KV cache in the running batch, the prefix cache
and chunked prefill, on a tiny random llama whose head size (64) quantization groups divide."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import BatchKVCache, KVCache

from engine.batch_adapter import Batch
from engine.quantized_cache import BatchQuantizedKVCache, KVQuantizationUnsupported, RowQuantizedKVCache
from tests.unit.random_llama import random_llama
from tests.unit.test_engine_core import EOS, gen, make_scheduler, run_to_end

VOCAB = 300
PROMPTS = {f"r{i}": [(7 * i + 3 * j) % (VOCAB - 2) + 2 for j in range(20 + 9 * i)] for i in range(4)}


def llama_model(hidden: int, heads: int, kv_heads: int, seed: int = 0) -> llama.Model:
    return random_llama(
        vocab=VOCAB,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=2 * hidden,
        context=1024,
        tied=False,
        seed=seed,
    )


@pytest.fixture(scope="module")
def model():
    return llama_model(hidden=128, heads=2, kv_heads=1)


def scheduler(model, kv_bits, **overrides):
    return make_scheduler(model, kv_bits=kv_bits, context_length=1024, **overrides)


def generate(model, kv_bits, prompts=PROMPTS, max_tokens=10, **overrides):
    s = scheduler(model, kv_bits, **overrides)
    for rid, prompt in prompts.items():
        s.add(b"w", gen(rid, prompt, max_tokens))
    return s, run_to_end(s)


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_requests_alone_and_batched_run_to_their_length(model, kv_bits):
    _, batched = generate(model, kv_bits)
    for rid, prompt in PROMPTS.items():
        _, alone = generate(model, kv_bits, {rid: prompt})
        assert [f.finish_reason for f in batched[rid]["finals"]] == ["length"]
        assert len(batched[rid]["tokens"]) == 10
        assert alone[rid]["tokens"] == batched[rid]["tokens"]


def test_the_batch_holds_quantized_rows_only_with_kv_bits(model):
    for kv_bits, kind in ((8, BatchQuantizedKVCache), (None, BatchKVCache)):
        s = scheduler(model, kv_bits)
        s.add(b"w", gen("a", PROMPTS["r1"], 50))
        for _ in range(3):
            s.step()
        caches = s.core.batch._gen._generation_batch.prompt_cache
        assert caches and all(type(c) is kind for c in caches)


def logits(model, prompts: list[list[int]], cache: list, steps: mx.array | None = None) -> mx.array:
    """Last-position logits after the left-padded prompts, then after each of ``steps``
    (rows of tokens, fed to both caches alike); default: the greedy tokens."""
    longest = max(map(len, prompts))
    tokens = mx.array([[0] * (longest - len(p)) + p for p in prompts])
    out = [model(tokens, cache=cache)[:, -1]]
    for i in range(3):
        fed = mx.argmax(out[-1], axis=-1) if steps is None else steps[:, i]
        out.append(model(fed[:, None], cache=cache)[:, -1])
    return mx.stack(out, axis=1)


@pytest.mark.parametrize(("kv_bits", "tolerance"), [(8, 0.02), (4, 0.25)])
def test_quantized_attention_logits_stay_close_to_full_precision(model, kv_bits, tolerance):
    prompts = list(PROMPTS.values())
    padding = [max(map(len, prompts)) - len(p) for p in prompts]
    layers = len(model.layers)
    full = logits(model, prompts, [BatchKVCache(padding) for _ in range(layers)])
    greedy = mx.argmax(full, axis=-1)
    quantized = logits(model, prompts, [BatchQuantizedKVCache(padding, 64, kv_bits) for _ in range(layers)], greedy)
    spread = float(full.max() - full.min())
    assert float(mx.abs(quantized - full).max()) <= tolerance * spread
    if kv_bits == 8:
        # Greedy picks agree wherever full precision's best token leads clearly.
        top2 = mx.topk(full, 2, axis=-1)
        clear = (top2[..., 1] - top2[..., 0]) > 2 * tolerance * spread
        agree = mx.argmax(quantized, axis=-1) == greedy
        assert bool(mx.all(agree | ~clear)) and bool(mx.any(clear))


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_one_row_gives_mlx_lms_single_sequence_quantized_logits(model, kv_bits):
    from mlx_lm.models.cache import QuantizedKVCache

    prompt = [PROMPTS["r2"]]
    layers = len(model.layers)
    ours = logits(model, prompt, [BatchQuantizedKVCache([0], 64, kv_bits) for _ in range(layers)])
    greedy = mx.argmax(ours, axis=-1)
    theirs = logits(model, prompt, [QuantizedKVCache(64, kv_bits) for _ in range(layers)], greedy)
    assert mx.array_equal(ours, theirs)


def test_8_bit_greedy_tokens_match_full_precision(model):
    # Over the first tokens: a near tie later on may go either way (measured on
    # SmolLM2 in bench/kv_quant.py).
    _, full = generate(model, None)
    _, quantized = generate(model, 8)
    for rid in PROMPTS:
        assert len(set(full[rid]["tokens"])) > 1  # a model that says something
        assert quantized[rid]["tokens"][:6] == full[rid]["tokens"][:6]


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_prefix_cache_keeps_quantized_entries_and_a_hit_reuses_them(model, kv_bits):
    prompt = PROMPTS["r3"]
    s, first = generate(model, kv_bits, {"miss": prompt})
    entries = list(s.core._prefix_cache._lru.values())
    assert entries and all(isinstance(c, RowQuantizedKVCache) and c.bits == kv_bits for c in entries[0].cache)
    s.add(b"w", gen("hit", prompt, 10))
    second = run_to_end(s)
    assert s.stats.prompt_cache_hits == 1 and s.stats.prompt_cache_hit_tokens == len(prompt) - 1
    assert second["hit"]["tokens"] == first["miss"]["tokens"]
    # The memory win: the same entry at full precision takes several times the bytes
    # (float32 here: 8 bits take 0.28 of them, 4 bits 0.16).
    full, _ = generate(model, None, {"miss": prompt})
    assert s.prefix_cache_bytes < 0.3 * full.prefix_cache_bytes


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_chunked_prefill_of_a_long_prompt(model, kv_bits):
    long_prompt = {"long": [(5 * j) % (VOCAB - 2) + 2 for j in range(300)]}
    _, whole = generate(model, kv_bits, long_prompt, prefill_step_size=512)
    _, chunked = generate(model, kv_bits, long_prompt, prefill_step_size=16)
    assert chunked["long"]["tokens"] == whole["long"]["tokens"]
    assert len(chunked["long"]["tokens"]) == 10


def test_head_size_not_divisible_by_the_group_size_is_refused():
    small_heads = llama_model(hidden=64, heads=4, kv_heads=2)  # head size 16
    with pytest.raises(KVQuantizationUnsupported, match="kv_group_size 64 does not divide this model's head size 16"):
        make_scheduler(small_heads, kv_bits=8, kv_group_size=64)


def test_group_size_larger_than_the_head_is_refused(model):
    with pytest.raises(KVQuantizationUnsupported, match="head size 64"):
        scheduler(model, 8, kv_group_size=128)


def test_layers_without_a_plain_kv_cache_are_refused(model, monkeypatch):
    from mlx_lm.models.cache import RotatingKVCache

    monkeypatch.setattr(model, "make_cache", lambda: [RotatingKVCache(max_size=64), KVCache()], raising=False)
    with pytest.raises(KVQuantizationUnsupported, match="RotatingKVCache"):
        scheduler(model, 8)


def test_without_kv_bits_mlx_lm_makes_the_caches():
    # The default path hands BatchGenerator no cache of its own: mlx-lm's KVCache rows.
    batch = Batch(llama_model(64, 4, 2), [EOS], 4, 4, 64, kv_bits=None, kv_group_size=64)
    batch.insert([2, 3, 4], 2, None, [], lambda x: mx.argmax(x, axis=-1), None, batch._gen._default_stop_sequences)
    assert all(type(c) is KVCache for c in batch._gen._unprocessed_sequences[0][3])
