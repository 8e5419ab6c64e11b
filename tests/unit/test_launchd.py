"""`python -m deploy.launchd`: a plist launchd accepts, or one error line and exit 2."""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy import launchd
from deploy.launchd import ERROR_PREFIX, EXIT_USAGE, example_plist, find_mlx_server, main
from deploy.settings import load_settings
from deploy.supervisor import ENGINE_STOP_TIMEOUT_S, WEB_STOP_TIMEOUT_S

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_FILE = REPO / "deploy" / "launchd" / "com.mlx-server.example.plist"

# Every key the job needs, with the type launchd expects.
KEYS: dict[str, type] = {
    "Label": str,
    "ProgramArguments": list,
    "RunAtLoad": bool,
    "KeepAlive": dict,
    "ProcessType": str,
    "ExitTimeOut": int,
    "WorkingDirectory": str,
    "StandardOutPath": str,
    "StandardErrorPath": str,
    "EnvironmentVariables": dict,
}


def make_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_dir(tmp_path / "my-model", {"config.json": "{}", "model.safetensors": ""})


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return make_dir(tmp_path / "adapter", {"adapter_config.json": "{}", "adapters.safetensors": ""})


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "venv" / "bin" / "mlx-server"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def write_plist(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    output = tmp_path / "job.plist"
    code, out, err = run(["--output", str(output), *argv], capsys)  # before any `--`
    assert code == 0, err
    assert out == ""
    with output.open("rb") as f:
        return plistlib.load(f)


def test_plist_has_every_key(model: Path, program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "logs"
    job = write_plist([str(model), "--mlx-server", str(program), "--log-dir", str(logs)], tmp_path, capsys)
    for key, kind in KEYS.items():
        assert isinstance(job[key], kind), key
    assert job["Label"] == "com.mlx-server.my-model"
    assert job["ProgramArguments"] == [str(program), str(model), "--port", "8001"]
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["ProcessType"] in {"Interactive", "Standard"}
    assert job["StandardOutPath"] == str(logs / "com.mlx-server.my-model.log")
    assert job["StandardErrorPath"] == str(logs / "com.mlx-server.my-model.err.log")
    assert Path(job["WorkingDirectory"]).is_absolute()
    env = job["EnvironmentVariables"]
    assert env["PATH"].split(os.pathsep)[0] == str(program.parent)
    assert "/usr/bin" in env["PATH"].split(os.pathsep)


def test_flags_pass_through(
    model: Path,
    adapter: Path,
    program: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        str(model),
        "--label", "com.example.qwen",
        "--port", "8002",
        "--adapter-path", str(adapter),
        "--mlx-server", str(program),
        "--env", "MLX_SERVER_WORKERS=3",
        "--env", "HF_HOME=/tmp/hf=x",
        "--", "--worker-connections", "8", "--host", "0.0.0.0",
    ]  # fmt: skip
    job = write_plist(argv, tmp_path, capsys)
    assert job["Label"] == "com.example.qwen"
    args = job["ProgramArguments"]
    assert args == [
        str(program), str(model), "--port", "8002", "--adapter-path", str(adapter),
        "--worker-connections", "8", "--host", "0.0.0.0",
    ]  # fmt: skip
    env = job["EnvironmentVariables"]
    assert env["MLX_SERVER_WORKERS"] == "3"
    assert env["HF_HOME"] == "/tmp/hf=x"  # split on the first '=' only
    # What launchd will run is what mlx-server accepts, with the job's environment.
    settings = load_settings(args[1:], env)
    assert (settings.port, settings.workers, settings.worker_connections) == (8002, 3, 8)
    assert settings.adapter_path == adapter


def test_relative_paths_become_absolute(
    model: Path,
    program: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # launchd expands neither ~ nor relative paths: the plist must hold absolute ones.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    job = write_plist(["my-model", "--mlx-server", str(program)], tmp_path, capsys)
    assert job["ProgramArguments"][1] == str(model)
    assert job["StandardErrorPath"] == str(
        tmp_path / "home" / "Library" / "Logs" / "mlx-server" / "com.mlx-server.my-model.err.log"
    )


def test_sharded_settings_pass_through_with_absolute_paths(
    model: Path,
    program: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosts = [{"ssh": "127.0.0.1", "ips": ["10.0.0.1"]}, {"ssh": "mac-b", "ips": ["10.0.0.2"]}]
    (tmp_path / "hosts.json").write_text(json.dumps(hosts))
    monkeypatch.chdir(tmp_path)
    argv = [str(model), "--mlx-server", str(program), "--", "--distributed-hostfile", "hosts.json"]
    job = write_plist([*argv, "--distributed-mode=pipeline"], tmp_path, capsys)
    args = job["ProgramArguments"]
    assert args[-3:] == ["--distributed-hostfile", str(tmp_path / "hosts.json"), "--distributed-mode=pipeline"]
    monkeypatch.chdir("/")  # launchd's job starts elsewhere: the plist's paths still hold
    group = load_settings(args[1:], job["EnvironmentVariables"]).distributed()
    assert group is not None and (group.mode, group.ranks) == ("pipeline", 2)


def test_stdout_by_default(model: Path, program: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([str(model), "--mlx-server", str(program)], capsys)
    assert code == 0, err
    assert plistlib.loads(out.encode())["Label"] == "com.mlx-server.my-model"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["{missing}"], "does not exist"),
        (["{model}", "--port", "0"], "port"),
        (["{model}", "--port", "eight"], "--port"),
        (["{model}", "--adapter-path", "{missing}"], "adapter_path"),
        (["{model}", "--label", "com.x/y"], "--label"),
        (["{model}", "--env", "NOEQUALS"], "--env"),
        (["{model}", "--env", "MLX_SERVER_WORKERS=zero"], "workers"),
        (["{model}", "--env", "MLX_SERVER_MAX_LOADED_MODELS=2"], "removed in 0.2"),
        (["{model}", "--mlx-server", "bin/mlx-server"], "absolute"),
        (["{model}", "--mlx-server", "{missing}"], "not an executable"),
        (["{model}", "--", "--workers", "0"], "workers"),
        (["{model}", "--", "--bogus"], "--bogus"),
        (["{model}", "--bogus"], "--bogus"),
        ([], "no model path"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    args: list[str],
    expected: str,
    model: Path,
    program: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = {"model": str(model), "missing": str(tmp_path / "missing")}
    argv = [a.format(**paths) for a in args]
    if "--mlx-server" not in argv:
        argv = ["--mlx-server", str(program), *argv]
    code, out, err = run(argv, capsys)
    assert code == EXIT_USAGE
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(ERROR_PREFIX), err
    assert expected in err


def test_bad_model_path_from_the_command_line(tmp_path: Path, program: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.launchd", str(tmp_path / "nope"), "--mlx-server", program],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_USAGE
    assert proc.stdout == ""
    missing = tmp_path / "nope"
    assert proc.stderr.splitlines() == [
        f"{ERROR_PREFIX}model_path: {missing} does not exist (from the MODEL_PATH argument)"
    ]


def test_mlx_server_found_beside_python(program: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_mlx_server(str(program.parent / "python")) == str(program)


def test_mlx_server_found_on_path(program: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(program.parent))
    assert find_mlx_server(str(tmp_path / "elsewhere" / "python")) == str(program)


def test_mlx_server_not_found(
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(launchd.sys, "executable", str(tmp_path / "python"))
    code, out, err = run([str(model)], capsys)
    assert code == EXIT_USAGE
    assert err.count("\n") == 1 and "--mlx-server" in err


def test_exit_timeout_covers_the_graceful_stop() -> None:
    # SIGKILL must not come before gunicorn has drained and the engine has stopped.
    assert example_plist()["ExitTimeOut"] > WEB_STOP_TIMEOUT_S + 5 + ENGINE_STOP_TIMEOUT_S


def test_shipped_example_is_the_tools_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--example"], capsys)
    assert code == 0
    assert EXAMPLE_FILE.read_text() == out, "regenerate: python -m deploy.launchd --example"
    job = plistlib.loads(EXAMPLE_FILE.read_bytes())
    assert set(KEYS) <= set(job)
    assert job["Label"] == "com.mlx-server.example"
