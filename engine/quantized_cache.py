"""Quantized KV cache for mlx-lm's BatchGenerator (``kv_bits``).

mlx-lm quantizes the KV cache of one sequence (``QuantizedKVCache``) but its
batch cache (``BatchKVCache``) is full precision only. ``BatchQuantizedKVCache``
is BatchKVCache's layout (left padding, per-row offsets, one shared write
index) with keys and values held as ``mx.quantize`` triples (packed uint32,
scales, biases). Every operation the batch needs (filter, extend, extract,
merge, right-padding roll, trim) moves whole token positions, i.e. indexes
axis 2, and quantization groups run along the head dimension (axis 3), so
each of the three arrays takes the same index as a full-precision one would.
Having ``bits`` makes mlx-lm's attention take its quantized path
(``quantized_scaled_dot_product_attention``).

Rows are quantized from their first token: prefill chunks, the running
batch and the prefix cache's entries all hold the quantized form, so the
memory a row takes is known from its length alone, a long prompt never holds
a full-precision copy while it prefills, and a prefix-cache hit brings back
the form a miss would build. (mlx-lm's single-sequence generate instead quantizes
once a sequence passes ``quantized_kv_start`` tokens, which leaves short
prompts unquantized and a long one's peak at full precision.) The price:
prefill attention also runs on the quantized cache. ``RowQuantizedKVCache`` is
one row out of the batch (what a finished sequence leaves to the prefix
cache, and what a cache hit brings back); BatchGenerator merges rows through
the row cache's ``merge``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache, _BaseCache, dynamic_roll, make_prompt_cache

from ipc.runtime import KV_BITS, KV_GROUP_SIZES

# mx.quantize's triple for one of keys/values: packed elements, scales, biases.
Quantized = tuple[mx.array, ...]


class KVQuantizationUnsupported(ValueError):
    """The loaded model cannot run with a quantized KV cache; one line for the operator."""


class RowQuantizedKVCache(QuantizedKVCache):
    """mlx-lm's single-sequence quantized cache, made mergeable into a batch."""

    def size(self) -> int:
        return int(self.offset)

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))


def _pad_axis2(parts: Quantized, left: int, right: int) -> Quantized:
    widths = [(0, 0), (0, 0), (left, right), (0, 0)]
    return tuple(mx.pad(x, widths) for x in parts)


class BatchQuantizedKVCache(_BaseCache):
    """BatchKVCache with quantized keys and values (see the module docstring)."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int, bits: int) -> None:
        self.keys: Quantized | None = None
        self.values: Quantized | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding: mx.array | None = None
        self.group_size = group_size
        self.bits = bits

    # ------------------------------------------------------------ writes

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Quantized, Quantized]:
        prev = self._idx
        steps = keys.shape[2]
        if self.keys is None or prev + steps > self.keys[0].shape[2]:
            self._grow(keys, values, prev, steps)
        assert self.keys is not None and self.values is not None
        self._idx += steps
        self.offset = self.offset + steps
        for stored, new in ((self.keys, keys), (self.values, values)):
            quantized = mx.quantize(new, group_size=self.group_size, bits=self.bits)
            for part, q in zip(stored, quantized):
                part[..., prev : self._idx, :] = q
        return self.keys_and_values()

    def _grow(self, keys: mx.array, values: mx.array, prev: int, steps: int) -> None:
        # Room for whole steps of positions, as BatchKVCache grows.
        batch, heads = keys.shape[:2]
        size = (self.step + steps - 1) // self.step * self.step
        per_int = 32 // self.bits

        def empty(dim: int) -> Quantized:
            shape = (batch, heads, size)
            return (
                mx.zeros((*shape, dim // per_int), dtype=mx.uint32),
                mx.zeros((*shape, dim // self.group_size), dtype=keys.dtype),
                mx.zeros((*shape, dim // self.group_size), dtype=keys.dtype),
            )

        new_k, new_v = empty(keys.shape[3]), empty(values.shape[3])
        if self.keys is None or self.values is None:
            self.keys, self.values = new_k, new_v
            return
        kept_k, kept_v = self.keys, self.values
        if prev % self.step != 0:
            kept_k, kept_v = (tuple(x[..., :prev, :] for x in kept) for kept in (kept_k, kept_v))
        self.keys = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(kept_k, new_k))
        self.values = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(kept_v, new_v))

    def keys_and_values(self) -> tuple[Quantized, Quantized]:
        assert self.keys is not None and self.values is not None
        idx = self._idx
        return tuple(x[..., :idx, :] for x in self.keys), tuple(x[..., :idx, :] for x in self.values)

    # ------------------------------------------------------------ padding (BatchGenerator's prefill)

    def prepare(
        self,
        *,
        left_padding: list[int] | None = None,
        lengths: list[int] | None = None,
        right_padding: list[int] | None = None,
    ) -> None:
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("Left padding can only be added to an empty BatchQuantizedKVCache")
            padding = mx.array(left_padding)
            self.left_padding = self.left_padding + padding
            self.offset = self.offset - padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self) -> None:
        # Right-padded prompts of unequal length: roll the padding to the left.
        if self._right_padding is None:
            return
        padding = self._right_padding
        roll = lambda x: dynamic_roll(x, padding[:, None], axis=2)  # noqa: E731
        self.keys, self.values = tree_map(roll, (self.keys, self.values))
        self.offset = self.offset - padding
        self.left_padding = self.left_padding + padding
        self._right_padding = None

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    # ------------------------------------------------------------ rows in and out

    def filter(self, batch_indices: list[int] | mx.array) -> None:
        """Keep only these rows, then drop the left padding every row has."""
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices], (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        paddings: list[int] = self.left_padding.tolist()  # type: ignore[assignment]
        shift = min(paddings)
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(lambda x: x[..., shift:, :], (self.keys, self.values))
            self._idx -= shift
            self.left_padding = self.left_padding - shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        """Append ``other``'s rows, right-justified at the longer write index."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        template = self.keys if self.keys is not None else other.keys
        template_v = self.values if self.values is not None else other.values
        assert template is not None and template_v is not None
        max_idx = max(self._idx, other._idx)
        max_size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def justified(c: BatchQuantizedKVCache) -> tuple[Quantized, Quantized, mx.array, mx.array]:
            k, v = c.keys, c.values
            if k is None or v is None:
                rows = c.offset.shape[0]
                k = tuple(mx.zeros((rows, *x.shape[1:2], 0, x.shape[3]), dtype=x.dtype) for x in template)
                v = tuple(mx.zeros((rows, *x.shape[1:2], 0, x.shape[3]), dtype=x.dtype) for x in template_v)
            assert k is not None and v is not None
            left = max_idx - c._idx
            right = max_size - k[0].shape[2] - left
            if right < 0:
                k = tuple(x[..., :right, :] for x in k)
                v = tuple(x[..., :right, :] for x in v)
                right = 0
            if left or right:
                k, v = _pad_axis2(k, left, right), _pad_axis2(v, left, right)
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = justified(self), justified(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(k1, k2))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(v1, v2))
        self.offset = mx.concatenate([o1, o2])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = max_idx

    def extract(self, idx: int) -> RowQuantizedKVCache:
        """Row ``idx`` alone, still quantized (contiguous: it must not pin the batch's buffers)."""
        cache = RowQuantizedKVCache(group_size=self.group_size, bits=self.bits)
        paddings: list[int] = self.left_padding.tolist()  # type: ignore[assignment]
        padding = paddings[idx]
        if self.keys is not None and self.values is not None:
            row = lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx])  # noqa: E731
            # mlx-lm's QuantizedKVCache is untyped: mypy infers None for its fields.
            cache.keys = tuple(row(x) for x in self.keys)  # type: ignore[assignment]
            cache.values = tuple(row(x) for x in self.values)  # type: ignore[assignment]
            cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        """One batch cache from row caches (RowQuantizedKVCache), left-padded to the longest."""
        first = caches[0]
        lengths = [c.size() for c in caches]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        cache = cls(padding, group_size=first.group_size, bits=first.bits)
        if longest == 0:
            return cache
        filled = [c for c in caches if c.keys is not None]

        def zeros(parts: Quantized) -> Quantized:
            return tuple(mx.zeros((len(caches), x.shape[1], longest, x.shape[3]), dtype=x.dtype) for x in parts)

        keys, values = zeros(filled[0].keys), zeros(filled[0].values)
        for row, (pad, c) in enumerate(zip(padding, caches)):
            if c.keys is None:
                continue
            for stored, own in ((keys, c.keys), (values, c.values)):
                for part, x in zip(stored, own):
                    part[row : row + 1, :, pad : pad + c.offset] = x[..., : c.offset, :]
        cache.keys, cache.values = keys, values
        cache.offset = cache.offset + longest
        cache._idx = longest
        return cache

    # ------------------------------------------------------------ bookkeeping

    @property
    def state(self) -> tuple[Any, ...]:
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v: tuple[Any, ...]) -> None:
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))


def quantized_row_cache(model: Any, bits: int, group_size: int) -> list[Any]:
    """A fresh per-layer cache for one row, quantized from its first token."""
    return [RowQuantizedKVCache(group_size=group_size, bits=bits) for _ in make_prompt_cache(model)]


def check_kv_quantization(model: Any, bits: int, group_size: int) -> None:
    """Refuse, in one line, a model the quantized batch cache cannot serve.

    Only plain KV layers are covered: sliding-window (RotatingKVCache) and
    non-attention (SSM, ArraysCache) layers would need their own quantized
    batch caches, so such models run without ``kv_bits``. A one-token
    forward through the quantized cache catches attention code that does
    not go through mlx-lm's quantized path (attention sinks, custom kernels).
    """
    if bits not in KV_BITS:
        raise KVQuantizationUnsupported(f"kv_bits must be one of {KV_BITS}, got {bits}")
    if group_size not in KV_GROUP_SIZES:
        raise KVQuantizationUnsupported(f"kv_group_size must be one of {KV_GROUP_SIZES}, got {group_size}")
    kinds = sorted({type(c).__name__ for c in make_prompt_cache(model) if type(c) is not KVCache})
    if kinds:
        raise KVQuantizationUnsupported(
            f"kv_bits needs a model whose every layer has a plain KV cache; this one has {', '.join(kinds)} "
            "layers (sliding window or non-attention): start it without kv_bits"
        )
    plain = make_prompt_cache(model)
    mx.eval(model(mx.array([[0]]), cache=plain))
    head_sizes = sorted({c.keys.shape[3] for c in plain} | {c.values.shape[3] for c in plain})
    if any(size % group_size for size in head_sizes):
        raise KVQuantizationUnsupported(
            f"kv_group_size {group_size} does not divide this model's head size "
            f"{'/'.join(map(str, head_sizes))}: pick one of {', '.join(map(str, KV_GROUP_SIZES))} that does, "
            "or start it without kv_bits"
        )
    caches = [BatchQuantizedKVCache([0], group_size, bits) for _ in plain]
    try:
        mx.eval(model(mx.array([[0]]), cache=caches))
    except Exception as exc:
        raise KVQuantizationUnsupported(f"this model's attention cannot use a quantized KV cache: {exc}") from None
