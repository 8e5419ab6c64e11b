"""Can this model be split over that many ranks? Asked before any rank starts.

Two looks, cheap first. `config_problem` reads the model's config.json (settings
validation: no mlx, milliseconds). `engine_problem` runs the engine's own check,
``python -m engine.sharding``, in a subprocess (it builds the model skeleton with
mlx-lm, which deploy never imports): shard/pipeline support, every size tensor
mode splits, a quantized model with an adapter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ipc.runtime import DistributedBackend, DistributedMode

# Exit status of `python -m engine.sharding` when the model cannot be split the asked way.
EXIT_CANNOT_SHARD = 2
# It imports mlx and mlx-lm and builds a weightless model: seconds, more on a cold disk.
ENGINE_CHECK_TIMEOUT_S = 120.0


def _sizes(model_path: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the engine's load reports an unreadable config in its own words
    if not isinstance(config, dict):
        return {}
    # Multimodal configs keep the language model's sizes in text_config.
    text = config.get("text_config")
    return {**(text if isinstance(text, dict) else {}), **config}


def config_problem(model_path: Path, mode: DistributedMode, ranks: int) -> str | None:
    """Why config.json's head or layer counts rule out `ranks` ranks in `mode`, or None."""
    sizes = _sizes(model_path)
    if mode == "tensor":
        heads = sizes.get("num_attention_heads")
        kv_heads = sizes.get("num_key_value_heads", heads)
        for count, what in ((heads, "attention heads"), (kv_heads, "key/value heads")):
            if isinstance(count, int) and count % ranks:
                return f"tensor mode over {ranks} ranks needs {what} divisible by {ranks}; {model_path} has {count}"
        return None
    layers = sizes.get("num_hidden_layers")
    if isinstance(layers, int) and layers < ranks:
        return f"pipeline mode over {ranks} ranks needs at least {ranks} layers; {model_path} has {layers}"
    return None


def engine_check_command(
    model_path: str, mode: DistributedMode, ranks: int, adapter_path: str | None, backend: DistributedBackend
) -> list[str]:
    command = [sys.executable, "-m", "engine.sharding", model_path, "--mode", mode, "--ranks", str(ranks)]
    return command + ["--backend", backend] + (["--adapter", adapter_path] if adapter_path else [])


def engine_problem(
    model_path: str,
    mode: DistributedMode,
    ranks: int,
    adapter_path: str | None,
    backend: DistributedBackend,
    env: dict[str, str],
) -> str | None:
    """The engine's one-line reason this model cannot be sharded so, or None when it can."""
    command = engine_check_command(model_path, mode, ranks, adapter_path, backend)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=ENGINE_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the sharding check (python -m engine.sharding) did not finish within {ENGINE_CHECK_TIMEOUT_S:.0f} s"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message"
    if done.returncode == EXIT_CANNOT_SHARD:
        return last
    return f"the sharding check (python -m engine.sharding) failed with code {done.returncode}: {last}"
