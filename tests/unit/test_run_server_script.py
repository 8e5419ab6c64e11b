"""run_server.sh: argument handling, with a fake `mlx-server` on PATH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "run_server.sh"
TIMEOUT_S = 120  # --demo may convert SmolLM2 on a cold cache


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A directory with an `mlx-server` that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mlx-server"
    fake.write_text('#!/usr/bin/env bash\necho "fake-mlx-server $*"\n')
    fake.chmod(0o755)
    return bin_dir


def _run(*args: str, path_prefix: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **env)
    if path_prefix is not None:
        full_env["PATH"] = f"{path_prefix}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=TIMEOUT_S, check=False
    )


@pytest.mark.parametrize("args", [(), ("--help",), ("--port", "8000")])
def test_without_model_exits_2_with_one_line_hint(args: tuple[str, ...], fake_bin: Path) -> None:
    result = _run(*args, path_prefix=fake_bin)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "/path/to/model" in result.stderr and "--demo" in result.stderr


def test_model_path_and_options_go_to_mlx_server(fake_bin: Path) -> None:
    result = _run("/some/model", "--port", "8123", path_prefix=fake_bin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fake-mlx-server /some/model --port 8123"


def test_demo_passes_the_converted_model_dir(fake_bin: Path, smollm2_dir: Path) -> None:
    # Point the converter's cache at the session's, so it is reused, not rebuilt.
    cache = str(smollm2_dir.parent)
    result = _run("--demo", "--port", "8123", path_prefix=fake_bin, MLX_SERVER_DEMO_CACHE=cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fake-mlx-server {smollm2_dir} --port 8123"
