"""engine/quantized_cache.py against mlx-lm's BatchKVCache: the same operations on the same
keys and values give the same layout (offsets, padding, masks) and, dequantized, the same
contents within quantization error."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache

from engine.quantized_cache import BatchQuantizedKVCache, RowQuantizedKVCache

HEADS, DIM = 2, 64
GROUP = 64
# Largest error of a dequantized element, relative to the largest magnitude
# (one step of the grid: range / (2**bits - 1), range <= 2 * max).
TOLERANCE = {8: 2.5 / 255, 4: 2.5 / 15}


def kv(rows: int, steps: int, seed: int) -> tuple[mx.array, mx.array]:
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    shape = (rows, HEADS, steps, DIM)
    return mx.random.normal(shape, key=k1), mx.random.normal(shape, key=k2)


def dequantized(parts: tuple[mx.array, ...], bits: int) -> mx.array:
    return mx.dequantize(*parts, group_size=GROUP, bits=bits)


def assert_close(quantized: tuple[mx.array, ...], full: mx.array, bits: int) -> None:
    if full.size == 0:  # a row with no tokens (all padding)
        assert all(x.shape[2] == full.shape[2] for x in quantized)
        return
    values = dequantized(quantized, bits)
    assert values.shape == full.shape
    scale = float(mx.abs(full).max()) or 1.0
    assert float(mx.abs(values - full).max()) <= TOLERANCE[bits] * scale


def assert_same_layout(q: BatchQuantizedKVCache, f: BatchKVCache) -> None:
    assert q._idx == f._idx
    assert q.offset.tolist() == f.offset.tolist()
    assert q.left_padding.tolist() == f.left_padding.tolist()


def assert_same_contents(q: BatchQuantizedKVCache, f: BatchKVCache, bits: int) -> None:
    assert_same_layout(q, f)
    (qk, qv), (fk, fv) = q.keys_and_values(), f.keys_and_values()
    # Positions left of a row's padding hold nothing in either cache: compare from it on.
    for row, pad in enumerate(f.left_padding.tolist()):
        assert_close(tuple(x[row : row + 1, :, pad:] for x in qk), fk[row : row + 1, :, pad:], bits)
        assert_close(tuple(x[row : row + 1, :, pad:] for x in qv), fv[row : row + 1, :, pad:], bits)


def pair(left_padding: list[int], bits: int) -> tuple[BatchQuantizedKVCache, BatchKVCache]:
    return BatchQuantizedKVCache(left_padding, GROUP, bits), BatchKVCache(left_padding)


def update(q: BatchQuantizedKVCache, f: BatchKVCache, steps: int, seed: int, bits: int) -> None:
    keys, values = kv(len(f.offset.tolist()), steps, seed)
    q_keys, q_values = q.update_and_fetch(keys, values)
    f_keys, f_values = f.update_and_fetch(keys, values)
    # What attention reads: every position so far, padding included.
    assert q_keys[0].shape[2] == f_keys.shape[2]
    assert_close(q_values, f_values, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_updates_past_a_step_keep_contents_and_mask(bits):
    q, f = pair([2, 0], bits)
    for seed, steps in enumerate([7, 1, 1, 300, 1]):  # 300: grows past one 256-position step
        update(q, f, steps, seed, bits)
        assert_same_contents(q, f, bits)
    assert q.make_mask(3).tolist() == f.make_mask(3).tolist()
    assert q.bits == bits and q.group_size == GROUP  # what sends mlx-lm's attention to its quantized path


@pytest.mark.parametrize("bits", [8, 4])
def test_right_padded_prefill_is_rolled_to_the_left(bits):
    q, f = pair([0, 0, 0], bits)
    for cache in (q, f):
        cache.prepare(lengths=[5, 3, 1], right_padding=[0, 2, 4])
    update(q, f, 5, seed=1, bits=bits)
    q.finalize()
    f.finalize()
    assert_same_contents(q, f, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_filter_extend_and_extract_as_batchkvcache_does(bits):
    q, f = pair([1, 0, 3], bits)
    update(q, f, 6, seed=2, bits=bits)
    q2, f2 = pair([0, 2], bits)
    update(q2, f2, 9, seed=3, bits=bits)
    q.extend(q2)
    f.extend(f2)
    assert_same_contents(q, f, bits)
    update(q, f, 1, seed=4, bits=bits)
    q.filter([1, 3])
    f.filter([1, 3])
    assert_same_contents(q, f, bits)
    for row in range(2):
        q_row, f_row = q.extract(row), f.extract(row)
        assert isinstance(q_row, RowQuantizedKVCache) and q_row.bits == bits
        assert q_row.offset == f_row.offset == q_row.size()
        assert_close(q_row.keys, f_row.keys, bits)
        assert_close(q_row.values, f_row.values, bits)


def test_extend_into_an_empty_cache_and_from_one():
    q, f = pair([0], 8)
    empty_q, empty_f = pair([0, 0], 8)
    update(q, f, 4, seed=5, bits=8)
    empty_q.extend(q)
    empty_f.extend(f)
    assert_same_contents(empty_q, empty_f, 8)
    q.extend(BatchQuantizedKVCache([0], GROUP, 8))
    f.extend(BatchKVCache([0]))
    assert_same_contents(q, f, 8)


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_merge_into_a_left_padded_batch(bits):
    rows_q, rows_f = [], []
    for seed, steps in enumerate([5, 12, 0]):
        row_q, row_f = RowQuantizedKVCache(group_size=GROUP, bits=bits), KVCache()
        if steps:
            keys, values = kv(1, steps, seed)
            row_q.update_and_fetch(keys, values)
            row_f.update_and_fetch(keys, values)
        rows_q.append(row_q)
        rows_f.append(row_f)
    q, f = RowQuantizedKVCache.merge(rows_q), BatchKVCache.merge(rows_f)
    assert isinstance(q, BatchQuantizedKVCache)
    assert_same_contents(q, f, bits)
    # An empty batch of empty rows, as BatchGenerator merges fresh prompts.
    empty = RowQuantizedKVCache.merge([RowQuantizedKVCache(group_size=GROUP, bits=bits)] * 2)
    assert empty.empty() and empty.offset.tolist() == [0, 0] and empty.nbytes == 0


def test_trimmed_rows_merge_only_their_kept_tokens():
    # The prefix cache trims an entry back to the shared prefix before it joins a batch.
    row_q, row_f = RowQuantizedKVCache(group_size=GROUP, bits=8), KVCache()
    keys, values = kv(1, 20, seed=6)
    row_q.update_and_fetch(keys, values)
    row_f.update_and_fetch(keys, values)
    assert row_q.trim(7) == row_f.trim(7) == 7
    q, f = RowQuantizedKVCache.merge([row_q]), BatchKVCache.merge([row_f])
    assert q.size() == f.size() == 13
    assert_same_contents(q, f, 8)
    assert q.trim(3) == f.trim(3) == 3
    assert_same_layout(q, f)


def test_quantized_bytes_per_token():
    # float32 keys: 8 bits store a quarter of the bytes plus a scale and a bias per group.
    for bits, expected in ((8, DIM * 1 + 2 * 4 * DIM // GROUP), (4, DIM // 2 + 2 * 4 * DIM // GROUP)):
        q, f = pair([0], bits)
        keys, values = kv(1, 256, seed=7)  # one whole step: no unused room
        q.update_and_fetch(keys, values)
        f.update_and_fetch(keys, values)
        per_token = q.nbytes / (256 * HEADS * 2)
        assert per_token == expected
        assert q.nbytes < f.nbytes * 0.3
