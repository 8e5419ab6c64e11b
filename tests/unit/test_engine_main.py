"""engine/__main__.py: the mlx settings it gives the engine process before mlx starts, the start-up heap freezing of the engine and the HTTP workers, and the config it must be started with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHOW = "import json, os, engine.__main__ as m; print(json.dumps({k: os.environ[k] for k in m.CUDA_SERVING_DEFAULTS}))"


def _engine_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    env.update(overrides)
    out = subprocess.run(
        [sys.executable, "-c", SHOW], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout)


def test_cuda_graphs_and_cudnn_attention_are_off_by_default():
    assert _engine_env() == {"MLX_USE_CUDA_GRAPHS": "0", "MLX_CUDA_USE_CUDNN_SDPA": "0"}


def test_a_users_own_values_win():
    env = _engine_env(MLX_USE_CUDA_GRAPHS="1", MLX_CUDA_USE_CUDNN_SDPA="1")
    assert env == {"MLX_USE_CUDA_GRAPHS": "1", "MLX_CUDA_USE_CUDNN_SDPA": "1"}


FROZEN = "import gc, sys, {module} as m; before = gc.get_freeze_count(); m.{hook}; print(before, gc.get_freeze_count())"


def _freeze_counts(module: str, hook: str) -> tuple[int, int]:
    # A fresh interpreter: freezing is process-wide and must not leak into this one.
    out = subprocess.run(
        [sys.executable, "-c", FROZEN.format(module=module, hook=hook)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    before, after = map(int, out.stdout.split())
    return before, after


def test_engine_freezes_its_start_up_heap_out_of_garbage_collection():
    before, after = _freeze_counts("engine.__main__", "freeze_startup_heap()")
    assert before == 0 and after > 1000  # mlx-lm and friends, imported by the module


def test_http_workers_freeze_theirs_after_loading_the_app():
    before, after = _freeze_counts("frontend.gunicorn_conf", "post_worker_init(None)")
    assert before == 0 and after > 1000


def test_engine_without_its_config_says_how_to_start_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")} | {"TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-m", "engine"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "engine: error: MLX_SERVER_RUNTIME_CONFIG is not set: start the server with mlx-server (or deploy.procfile)"
    ]
