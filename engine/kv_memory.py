"""KV cache bytes per token of the loaded model, and the default KV budget of this device.

Both are computed, not measured: bytes per token come from the model's
config (layers, KV heads, head size) and the activation dtype, so every rank
of a sharded engine, whatever layers or heads it holds itself, gets the same
figure for the whole model and takes the same admission and eviction
decisions. The layout follows mlx-lm's caches: ``KVCache`` keeps keys and
values in the activation dtype; ``QuantizedKVCache`` keeps what
``mx.quantize`` returns: the elements packed at ``bits`` each, plus a scale
and a bias in the activation dtype for every group of ``group_size``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

log = logging.getLogger(__name__)

# mlx-lm's default KV quantization group (QuantizedKVCache, generate's kv_group_size).
DEFAULT_KV_GROUP_SIZE = 64
# Kept free of KV when the budget is derived: the prefill forward's
# activations (up to engine.prefill.PREFILL_FORWARD_TOKENS tokens at once),
# the copies a growing batch cache makes (old and new buffer side by side
# until the old one is freed) and MLX's own buffers. A share of the usable
# memory, at least a fixed floor, so small machines keep room too.
KV_HEADROOM_SHARE = 0.1
KV_HEADROOM_MIN_BYTES = 1 << 30


@dataclass(frozen=True)
class KvShape:
    """What one token costs in every layer: keys and values of ``kv_heads`` heads."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int  # the activation dtype's size: keys, values and quantization scales/biases

    def bytes_per_token(self, kv_bits: int | None = None, kv_group_size: int = DEFAULT_KV_GROUP_SIZE) -> int:
        return self.layers * self.kv_heads * 2 * vector_bytes(self.head_dim, self.dtype_bytes, kv_bits, kv_group_size)


def vector_bytes(dim: int, dtype_bytes: int, kv_bits: int | None, group_size: int) -> int:
    """Bytes of one head's key (or value) for one token."""
    if kv_bits is None:
        return dim * dtype_bytes
    # mx.quantize packs elements into uint32 words and keeps one scale and
    # one bias per group, in the input's dtype.
    packed = dim * kv_bits // 32 * 4
    return packed + 2 * (dim // group_size) * dtype_bytes


def kv_shape(model: Any) -> KvShape:
    """The whole model's KV shape from its config (``model.args``), not from this rank's layers."""
    args = getattr(model, "args", None)
    if args is None:
        raise ValueError(f"{type(model).__name__} has no args: its KV bytes per token cannot be computed")
    # Multimodal wrappers keep the language model's config apart.
    args = getattr(args, "text_config", None) or args
    get = (lambda key: args.get(key)) if isinstance(args, dict) else (lambda key: getattr(args, key, None))
    layers = get("num_hidden_layers")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    hidden = get("hidden_size")
    head_dim = get("head_dim") or (hidden // heads if heads and hidden else None)
    if not (layers and kv_heads and head_dim):
        missing = [name for name, v in (("layers", layers), ("kv heads", kv_heads), ("head size", head_dim)) if not v]
        raise ValueError(
            f"the model's config ({get('model_type') or type(model).__name__}) names no {', '.join(missing)}: "
            "its KV bytes per token cannot be computed"
        )
    return KvShape(int(layers), int(kv_heads), int(head_dim), activation_dtype(model).size)


def activation_dtype(model: Any) -> mx.Dtype:
    """The dtype keys and values are computed in: that of most of the model's floating
    point parameters (a quantized model's scales: its packed weights are integers; a
    few norms kept in float32 do not count)."""
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    by_dtype: dict[mx.Dtype, int] = {}
    for _, value in params:
        if mx.issubdtype(value.dtype, mx.floating):
            by_dtype[value.dtype] = by_dtype.get(value.dtype, 0) + value.nbytes
    return max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else mx.float16


def model_bytes_per_token(model: Any, kv_bits: int | None = None, kv_group_size: int = DEFAULT_KV_GROUP_SIZE) -> int:
    return kv_shape(model).bytes_per_token(kv_bits, kv_group_size)


# ---------------------------------------------------------------- the budget


@dataclass(frozen=True)
class DerivedBudget:
    """The default KV budget and what it came from (logged at startup)."""

    usable_bytes: int  # what the device lets MLX use
    weights_bytes: int  # MLX's active memory once the model is loaded
    headroom_bytes: int
    budget_bytes: int

    def describe(self) -> str:
        return (
            f"{size(self.budget_bytes)} = usable {size(self.usable_bytes)} "
            f"- model {size(self.weights_bytes)} - headroom {size(self.headroom_bytes)}"
        )


def size(n_bytes: int) -> str:
    """Bytes for a log line: GB, or MB below one GB."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def usable_memory() -> int:
    """Memory MLX may use on this device: the working set the GPU driver recommends
    (Metal), else the device's memory, else RAM (CPU), capped by MLX's memory limit."""
    info = mx.device_info()
    size = info.get("max_recommended_working_set_size") or info.get("memory_size") or info.get("total_memory")
    if not isinstance(size, int) or size <= 0:
        size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = mx.get_memory_limit()
    return min(size, limit) if limit > 0 else size


def headroom(usable: int) -> int:
    return max(int(usable * KV_HEADROOM_SHARE), KV_HEADROOM_MIN_BYTES)


def derive_budget(usable: int | None = None, weights: int | None = None) -> DerivedBudget:
    """usable memory - the loaded model (active memory) - headroom; never below 0."""
    usable = usable_memory() if usable is None else usable
    weights = mx.get_active_memory() if weights is None else weights
    room = headroom(usable)
    return DerivedBudget(usable, weights, room, max(usable - weights - room, 0))


def resolve_budget(setting_bytes: int, bytes_per_token: int) -> int:
    """The KV budget in bytes: the setting, or (0) the derived default.

    A sharded engine's ranks must run with one figure: a derived one depends
    on each rank's own device and share of the model."""
    if setting_bytes > 0:
        budget = setting_bytes
        log.info("KV cache budget %s (kv_cache_budget_bytes)", size(budget))
    else:
        derived = derive_budget()
        if derived.budget_bytes <= 0:
            raise ValueError(
                f"no memory is left for the KV cache once the model is loaded ({derived.describe()}): "
                "set kv_cache_budget_bytes"
            )
        budget = derived.budget_bytes
        log.info("KV cache budget %s (derived; kv_cache_budget_bytes overrides it)", derived.describe())
    log.info(
        "KV cache: %d bytes per token, the budget holds %d tokens", bytes_per_token, budget // max(bytes_per_token, 1)
    )
    return budget


def local_kv_share(model: Any, mode: str, ranks: int) -> float:
    """The part of the whole model's KV cache this rank of a sharded engine holds:
    its heads' share in tensor mode, its layers' share in pipeline mode."""
    if mode == "tensor":
        return 1 / ranks
    inner = model.model
    return len(inner.pipeline_layers) / kv_shape(model).layers


def rank_budget(model: Any, mode: str, ranks: int, ranks_on_this_host: int) -> int:
    """This rank's derived KV budget in whole-model bytes (what the group could hold if every
    rank had this one's room). Ranks that share a host share its memory."""
    derived = derive_budget()
    room = derived.budget_bytes / ranks_on_this_host
    log.info("this rank's KV room: %s of %s", size(int(room)), derived.describe())
    return int(room / local_kv_share(model, mode, ranks))
