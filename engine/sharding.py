"""Can this model be sharded this way, and doing it: one model over an mlx.distributed group.

``sharding_problem`` is the pre-check (the supervisor runs
``python -m engine.sharding MODEL --mode M --ranks N [--adapter PATH] [--backend B]``
before it launches a group, and every rank runs it again at load): one
line saying why the model cannot be split the asked way, or None.
``prepare`` fuses a LoRA adapter into the weights and shards the model.

mlx-lm's own sharded loading refuses adapters: its shard functions split
plain and quantized Linear layers, not LoRA wrappers. Folding the adapter
into the weights first (what mlx_lm.fuse does) leaves plain layers that
shard like any model, with the same outputs as the unfused adapter. A
quantized base would have to be re-quantized after folding, which changes
the weights the adapter was trained on: refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from ipc.runtime import DistributedBackend, DistributedMode

# The settings' own lists (ipc.runtime), for the pre-check's command line.
MODES: tuple[DistributedMode, ...] = get_args(DistributedMode)
BACKENDS: tuple[DistributedBackend, ...] = get_args(DistributedBackend)
# Exit status of the pre-check when the model cannot be sharded as asked (a usage error).
EXIT_CANNOT_SHARD = 2
# config.json keys whose values tensor parallelism splits across ranks.
_TENSOR_SPLIT_KEYS = (
    ("num_attention_heads", "attention heads"),
    ("num_key_value_heads", "key/value heads"),
    ("intermediate_size", "MLP width (intermediate_size)"),
)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal configs keep the language model's sizes in text_config.
    return {**config.get("text_config", {}), **config}


def _is_quantized(config: dict[str, Any]) -> bool:
    text = config.get("text_config", {})
    return any(k in c for c in (config, text) for k in ("quantization", "quantization_config"))


def _model_skeleton(config: dict[str, Any]) -> Any:
    """The model's module tree without weights (lazy parameters: no memory)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config=config)
    return model_class(args_class.from_dict(config))


def sharding_problem(
    model_path: str,
    mode: DistributedMode,
    ranks: int,
    adapter_path: str | None = None,
    backend: DistributedBackend = "ring",
) -> str | None:
    """Why ``model_path`` cannot run on ``ranks`` ranks in ``mode`` over ``backend``, in one
    line; None when it can."""
    if mode not in MODES:
        return f"unknown distributed mode {mode!r} (expected one of {', '.join(MODES)})"
    if ranks < 1:
        return f"a group needs at least one rank, not {ranks}"
    if backend == "nccl" and not _cuda_available():
        return "distributed_backend nccl needs NVIDIA GPUs and mlx's CUDA build; this machine has neither: use ring"
    try:
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"cannot read {model_path}/config.json: {exc}"
    if adapter_path is not None and _is_quantized(config):
        return (
            "a LoRA adapter on a sharded quantized model is not supported: the adapter is fused into the "
            "weights before sharding, and a quantized model would have to be re-quantized (use the "
            "unquantized model, or fuse the adapter with mlx_lm.fuse and quantize the result)"
        )
    try:
        model = _model_skeleton(config)
    except Exception as exc:  # an unknown model_type, a config the architecture rejects
        return f"cannot build the model of {model_path}: {type(exc).__name__}: {exc}"
    model_type = config.get("model_type", "?")
    if mode == "tensor":
        if not hasattr(model, "shard"):
            return f"{model_type} models cannot be sharded by tensor in mlx-lm (no shard method); try pipeline mode"
        sizes = _text_config(config)
        for key, what in _TENSOR_SPLIT_KEYS:
            value = sizes.get(key)
            if isinstance(value, int) and value % ranks:
                return f"tensor mode over {ranks} ranks needs {what} divisible by {ranks}, this model has {value}"
        return None
    inner = getattr(model, "model", None)
    if not hasattr(inner, "pipeline"):
        return f"{model_type} models cannot be split into a pipeline in mlx-lm; try tensor mode"
    layers = len(inner.layers)  # type: ignore[union-attr]
    if ranks > layers:
        return f"pipeline mode over {ranks} ranks needs at least {ranks} layers, this model has {layers}"
    return None


def _cuda_available() -> bool:
    import mlx.core as mx

    return bool(mx.cuda.is_available())


def fuse_adapter(model: Any) -> None:
    """Fold the LoRA (or DoRA) layers that load_adapters put in into plain Linear layers."""
    from mlx.utils import tree_unflatten

    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


def prepare(model: Any, mode: DistributedMode, group: Any, with_adapter: bool) -> None:
    """Fuse the adapter, then keep only this rank's shard of the model."""
    if with_adapter:
        fuse_adapter(model)
    if mode == "tensor":
        model.shard(group)
    else:
        model.model.pipeline(group)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m engine.sharding",
        description="Check that a model can be sharded over a group: exit 0, or one line on stderr and exit 2.",
    )
    p.add_argument("model_path")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--adapter", default=None, help="LoRA adapter directory")
    p.add_argument("--backend", choices=BACKENDS, default="ring")
    args = p.parse_args(argv)
    problem = sharding_problem(args.model_path, args.mode, args.ranks, args.adapter, args.backend)
    if problem is None:
        return 0
    print(problem, file=sys.stderr)
    return EXIT_CANNOT_SHARD


if __name__ == "__main__":
    sys.exit(main())
