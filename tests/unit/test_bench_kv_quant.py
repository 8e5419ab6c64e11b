"""bench/kv_quant.py's measurements on a tiny model: bytes per token from real caches, the
agreement arithmetic, and perplexity through the quantized cache."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from bench.kv_quant import agreement, bytes_per_token, parse_args, perplexities
from tests.unit.test_engine_kv_quant import llama_model


@pytest.fixture(scope="module")
def model():
    return llama_model(hidden=128, heads=2, kv_heads=1)


def test_bytes_per_token_of_bf16_activations_meet_the_memory_targets(model):
    model.set_dtype(mx.bfloat16)
    try:
        full, q8, q4 = (bytes_per_token(model, bits, 64) for bits in (None, 8, 4))
    finally:
        model.set_dtype(mx.float32)
    # 2 layers x (keys + values) x 1 kv head x 64 elements: 2 bytes each at bf16; 8 bits take
    # 1 byte plus a bf16 scale and bias per 64 elements, 4 bits half a byte plus the same.
    assert full == 2 * 2 * 64 * 2
    assert q8 == 2 * 2 * (64 + 4) and q8 / full <= 0.55
    assert q4 == 2 * 2 * (32 + 4) and q4 / full <= 0.3


def test_agreement_counts_positions_and_the_first_divergence():
    full = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    quantized = [[1, 2, 0, 4], [5, 6], [7, 8]]
    a = agreement(full, quantized, 8)
    assert a.identical == 6 / 9
    assert a.identical_answers == 1
    assert a.first_divergence == [2, None, 2]


def test_perplexity_of_full_precision_has_no_divergence(model):
    tokens = [(13 * i) % 290 + 5 for i in range(70)]
    full, q8, q4 = perplexities(model, tokens, 64, chunk=16)
    assert full.kl_from_full == 0 and full.tokens == 69
    assert 0 <= q8.kl_from_full < q4.kl_from_full
    assert math.isclose(q8.perplexity, full.perplexity, rel_tol=0.02)


def test_cli_defaults():
    args = parse_args([])
    assert args.streams == [1, 8, 32, 64] and args.group_size == 64 and args.out is None
