"""engine/__main__.py: the mlx settings it gives the engine process before mlx starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHOW = (
    "import json, os, engine.__main__ as m; "
    "print(json.dumps({k: os.environ[k] for k in m.CUDA_SERVING_DEFAULTS}))"
)


def _engine_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    env.update(overrides)
    out = subprocess.run([sys.executable, "-c", SHOW], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


def test_cuda_graphs_and_cudnn_attention_are_off_by_default():
    assert _engine_env() == {"MLX_USE_CUDA_GRAPHS": "0", "MLX_CUDA_USE_CUDNN_SDPA": "0"}


def test_a_users_own_values_win():
    env = _engine_env(MLX_USE_CUDA_GRAPHS="1", MLX_CUDA_USE_CUDNN_SDPA="1")
    assert env == {"MLX_USE_CUDA_GRAPHS": "1", "MLX_CUDA_USE_CUDNN_SDPA": "1"}
