"""`python -m deploy.procfile engine|web`: settings from the environment, then the real command
with the config mlx-server would hand it."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest

from deploy import procfile
from deploy.settings import SettingsError, load_settings
from ipc import runtime

REPO = Path(__file__).resolve().parents[2]
ADDRESS = "ipc:///tmp/mlx-server-test/engine.sock"
IN_USE_HINT = "(another server or mlx-server instance): choose another --port"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def env_for(model: Path, **extra: str) -> dict[str, str]:
    return {"MLX_SERVER_MODEL_PATH": str(model), "MLX_SERVER_IPC_ADDRESS": ADDRESS, **extra}


def test_engine_command(model: Path):
    env = env_for(model, MLX_SERVER_MAX_BATCH_SIZE="7", MLX_SERVER_LOG_FORMAT="json", PORT="5100")
    argv, child_env = procfile.command("engine", procfile.resolve("engine", env), env)
    assert argv[:3] == [sys.executable, "-m", "engine"]
    config = runtime.from_environ(child_env)
    assert config.ipc_address == ADDRESS
    assert config.model_path == str(model)
    assert config.engine.max_batch_size == 7
    assert config.log_format == "json"
    assert child_env.items() >= env.items()  # the runner's environment, plus the config


def test_both_roles_get_what_mlx_server_would_hand_them(model: Path):
    env = env_for(model, MLX_SERVER_MAX_QUEUED_REQUESTS="9", MLX_SERVER_API_KEY="k", PORT="5000")
    engine = runtime.from_environ(procfile.command("engine", procfile.resolve("engine", env), env)[1])
    web = runtime.from_environ(procfile.command("web", procfile.resolve("web", env), env)[1])
    assert engine == web == load_settings([], env).runtime_config(ADDRESS)
    assert web.web.api_keys == ("k",) and web.web.max_queued_requests == engine.engine.max_queued_requests == 9


def test_web_binds_the_runners_port(model: Path):
    env = env_for(model, PORT="5000", MLX_SERVER_WORKERS="3")
    argv, child_env = procfile.command("web", procfile.resolve("web", env), env)
    assert argv[:3] == [sys.executable, "-m", "gunicorn"]
    assert argv[argv.index("--bind") + 1] == "127.0.0.1:5000"
    assert argv[argv.index("--workers") + 1] == "3"
    config = runtime.from_environ(child_env)
    assert config.ipc_address == ADDRESS
    # The workers can load the tokenizer before the engine is up.
    assert config.model_path == str(model)
    # No supervisor to watch (gunicorn must not shut itself down looking for one), no drain flag.
    assert config.web.supervisor_pid is None and config.web.drain_flag is None


def test_mlx_server_port_wins_over_port(model: Path):
    env = env_for(model, PORT="5000", MLX_SERVER_PORT="8123", MLX_SERVER_HOST="0.0.0.0")
    argv, _ = procfile.command("web", procfile.resolve("web", env), env)
    assert argv[argv.index("--bind") + 1] == "0.0.0.0:8123"


def test_the_engine_socket_must_be_named(model: Path):
    with pytest.raises(SettingsError, match="set MLX_SERVER_IPC_ADDRESS"):
        procfile.resolve("engine", {"MLX_SERVER_MODEL_PATH": str(model)})


@pytest.mark.parametrize("role", procfile.ROLES)
def test_a_sharded_engine_needs_the_supervisor(model: Path, role: str):
    env = {"MLX_SERVER_MODEL_PATH": str(model), "MLX_SERVER_IPC_ADDRESS": "tcp://127.0.0.1:5557"}
    with pytest.raises(SettingsError, match="a sharded engine .* runs under mlx-server"):
        procfile.resolve(role, {**env, "MLX_SERVER_DISTRIBUTED_RANKS": "2"})


def test_bad_settings_are_one_line_and_exit_2(model: Path, monkeypatch, capsys):
    monkeypatch.setenv("MLX_SERVER_MODEL_PATH", str(model))
    monkeypatch.setenv("MLX_SERVER_IPC_ADDRESS", ADDRESS)
    monkeypatch.setenv("MLX_SERVER_MAX_LOADED_MODELS", "3")  # removed in 0.2
    assert procfile.main(["web"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlx-server web: error: `MLX_SERVER_MAX_LOADED_MODELS` was removed in 0.2")
    assert err.count("\n") == 1


def test_a_taken_port_is_one_line_and_exit_2_before_gunicorn_starts(model: Path, monkeypatch, capsys):
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        monkeypatch.setenv("MLX_SERVER_MODEL_PATH", str(model))
        monkeypatch.setenv("MLX_SERVER_IPC_ADDRESS", ADDRESS)
        monkeypatch.setenv("PORT", str(port))
        assert procfile.main(["web"]) == 2  # returns: nothing was exec'ed
    err = capsys.readouterr().err
    assert err == f"mlx-server web: error: port {port} on 127.0.0.1 is already in use {IN_USE_HINT}\n"


def test_procfile_runs_both_roles():
    """honcho's and foreman's grammar: `name: command`, web first so it gets the base $PORT."""
    lines = [line for line in (REPO / "Procfile").read_text().splitlines() if re.match(r"^[A-Za-z0-9_-]+:", line)]
    assert lines == ["web: python -m deploy.procfile web", "engine: python -m deploy.procfile engine"]
