"""Every startup error is one line on stderr and a non-zero exit within seconds."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from tests.integration.server import REPO_ROOT, ServerProcess, child_env, mlx_server_command

FAST_EXIT_S = 30  # generous bound for a cold interpreter on a loaded CI box


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        mlx_server_command(*args),
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=FAST_EXIT_S,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mlx-server: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in result.stderr


def test_no_model_path():
    assert_one_line_error(run_cli(), "model path")


def test_model_path_does_not_exist(tmp_path):
    assert_one_line_error(run_cli(str(tmp_path / "missing")), "missing")


def test_path_without_model(tmp_path):
    assert_one_line_error(run_cli(str(tmp_path)), str(tmp_path))


def test_bad_adapter_path(tiny_model_dir, tmp_path):
    result = run_cli(str(tiny_model_dir), "--adapter-path", str(tmp_path / "nope"))
    assert_one_line_error(result, "adapter")


def test_old_model_flag_says_path_is_positional(tiny_model_dir):
    result = run_cli("--model", str(tiny_model_dir))
    assert result.returncode == 2
    assert_one_line_error(result, "--model", "positional")


@pytest.mark.parametrize("key", ["max_loaded_models", "model_cache_size_gb", "auto_unload_timeout", "models_cache_dir"])
def test_removed_setting_in_config_file(tiny_model_dir, tmp_path, key):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_path": str(tiny_model_dir), key: 1}))
    assert_one_line_error(run_cli("--config", str(config)), key, "removed")


def test_removed_models_dir_env(tiny_model_dir, tmp_path):
    result = run_cli(str(tiny_model_dir), env={"MLX_SERVER_MODELS_DIR": str(tmp_path)})
    assert_one_line_error(result, "MLX_SERVER_MODELS_DIR", "removed")


def test_engine_dying_at_startup_exits_nonzero_with_its_error(tmp_path, server_logs):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    server = ServerProcess(broken, server_logs)
    code = server.proc.wait(FAST_EXIT_S * 4)
    server.stop()
    log = server.log_text()
    assert code != 0
    assert "engine: failed to load model" in log
    assert "mlx-server: error: the engine exited" in log


def test_sigint_and_sigterm_stop_everything(tiny_model_dir, server_logs):
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        server = ServerProcess(tiny_model_dir, server_logs).wait_ready()
        assert len(server.process_tree()) >= 4  # supervisor, engine, gunicorn master, workers
        assert server.stop(sig) == 0  # stop() also asserts no process is left


def test_a_port_another_server_holds_is_refused_before_the_model_loads(tiny_model_dir):
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        result = run_cli(str(tiny_model_dir), "--port", str(port))
    assert result.returncode == 2
    assert_one_line_error(result, f"port {port}", "already in use", "--port")
    assert "loading model" not in result.stderr
