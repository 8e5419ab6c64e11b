"""`mlx-server`: every error is one stderr line and exit 2; good settings reach `run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import EXIT_USAGE, main
from deploy.settings import ENV_PREFIX, Settings
from ipc import runtime

REPO = Path(__file__).resolve().parents[2]
ERROR_PREFIX = "mlx-server: error: "


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() reads os.environ; a developer's MLX_SERVER_* variables must not change the outcome.
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").touch()
    return path


class RecordingRun:
    """Stands in for deploy.supervisor.run: records what it was given, returns a chosen code."""

    def __init__(self, code: int = 0) -> None:
        self.code = code
        self.calls: list[Settings] = []

    def __call__(self, settings: Settings) -> int:
        self.calls.append(settings)
        return self.code


def test_run_receives_resolved_settings(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"worker_connections": 8, "port": 9000}))
    monkeypatch.setenv("MLX_SERVER_PORT", "9001")
    run = RecordingRun()
    argv = [str(model), "--config", str(config), "--workers", "3", "--log-level", "debug"]
    assert main(argv, run=run) == 0
    [settings] = run.calls
    assert settings.model_path == model
    assert (settings.workers, settings.worker_connections, settings.port) == (3, 8, 9001)
    assert settings.log_level == "debug" and settings.config == config


@pytest.mark.parametrize("code", [0, 1, 3, 143])
def test_run_return_code_is_exit_code(model: Path, code: int) -> None:
    assert main([str(model)], run=RecordingRun(code)) == code


def assert_one_error_line(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(ERROR_PREFIX)
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


ERRORS = [
    ([], "no model path: pass it as `mlx-server /path/to/model`"),
    (["/no/such/model"], "/no/such/model does not exist"),
    (["{model}", "--port", "70000"], "port: 70000 is out of range 1-65535"),
    (["{model}", "--workers", "0"], "workers: "),
    (["{model}", "--worker-connections", "-2"], "worker_connections: "),
    (["{model}", "--log-level", "loud"], "unknown log level 'loud'"),
    (["{model}", "--adapter-path", "/no/such/adapter"], "/no/such/adapter does not exist"),
    (["{model}", "--config", "/no/such/config.json"], "cannot read config file /no/such/"),
    (["{model}", "--prot", "8001"], "unrecognized arguments: --prot 8001"),
    (["{model}", "--port"], "expected one argument"),
    (["{model}", "--max-loaded-models", "2"], "`--max-loaded-models` was removed in 0.2"),
    (["{model}", "--models-cache-dir", "/m"], "pass the model directory path directly"),
    (["--model", "/m/q"], "--model was removed in 0.2: the model path is now positional: mlx-server /m/q"),
]


@pytest.mark.parametrize(("argv", "fragment"), ERRORS)
def test_errors_exit_2_with_one_line(
    model: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    run = RecordingRun()
    assert main([arg.format(model=model) for arg in argv], run=run) == EXIT_USAGE
    assert_one_error_line(capsys, fragment)
    assert run.calls == []


def test_removed_env_var_exits_2(
    model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLX_SERVER_MODELS_DIR", "/models")
    assert main([str(model)], run=RecordingRun()) == EXIT_USAGE
    assert_one_error_line(capsys, "`MLX_SERVER_MODELS_DIR` was removed in 0.2", "Migrating from")


def test_unknown_env_var_is_a_warning_and_the_server_still_runs(
    model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLX_SERVER_THREADS", "8")  # renamed before 0.2
    monkeypatch.setenv("MLX_SERVER_PROT", "9000")  # a typo
    monkeypatch.setenv(runtime.CONFIG_ENV, "{}")  # what the supervisor hands its children, no warning
    run = RecordingRun()
    assert main([str(model)], run=run) == 0
    assert len(run.calls) == 1
    assert capsys.readouterr().err.splitlines() == [
        "mlx-server: warning: MLX_SERVER_PROT is not a setting and is ignored (did you mean MLX_SERVER_PORT?)",
        "mlx-server: warning: MLX_SERVER_THREADS is not a setting and is ignored"
        " (did you mean MLX_SERVER_WORKER_CONNECTIONS?)",
    ]


def test_removed_config_key_exits_2(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auto_unload_timeout": 300}))
    assert main([str(model), "--config", str(config)], run=RecordingRun()) == EXIT_USAGE
    assert_one_error_line(capsys, "`auto_unload_timeout` was removed in 0.2", "stop the instance")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    run = RecordingRun()
    assert main(["--version"], run=run) == 0
    assert capsys.readouterr().out == "mlx-server 0.2.0\n"
    assert run.calls == []


def test_help_lists_flags_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], run=RecordingRun()) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mlx-server")
    for flag in ("MODEL_PATH", "--adapter-path", "--port", "--config", "MLX_SERVER_PORT"):
        assert flag in out
    assert "--max-loaded-models" not in out and "--model " not in out


def test_python_dash_m_reports_error_without_starting_anything(tmp_path: Path) -> None:
    # The one real process here: `python -m deploy.cli` works, and an error path never imports
    # the supervisor (or anything that would start processes or load mlx).
    code = (
        "import runpy, sys; sys.argv = ['mlx-server', '/no/such/model']\n"
        "try:\n    runpy.run_module('deploy.cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert 'deploy.supervisor' not in sys.modules and 'mlx' not in sys.modules\n"
        "    raise\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert done.stdout == ""
    expected = "model_path: /no/such/model does not exist (from the MODEL_PATH argument)"
    assert done.stderr == f"{ERROR_PREFIX}{expected}\n"
