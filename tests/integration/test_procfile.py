"""The Procfile under honcho: both processes serve, the web side outlives the engine, SIGTERM stops all."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.server import REPO_ROOT, ChildProcess, child_env, free_port
from tests.waiting import wait_until

START_TIMEOUT_S = 120.0
POLL_S = 0.2

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}


class Honcho(ChildProcess):
    """`honcho start [PROCESS]` on the repository's Procfile, output in a log file."""

    def __init__(self, env_file: Path, log_path: Path, *processes: str) -> None:
        venv_bin = str(Path(sys.executable).parent)
        # The Procfile says `python`: the interpreter running the tests must be the one found.
        env = child_env({"PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")})
        cmd = [sys.executable, "-m", "honcho", "--no-colour", "-e", str(env_file), "-d", str(REPO_ROOT)]
        cmd += ["-f", str(REPO_ROOT / "Procfile"), "start", *processes]
        super().__init__(cmd, log_path, env)


@pytest.fixture
def env_file(tiny_model_dir: Path, tmp_path: Path) -> Path:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    path = tmp_path / ".env"
    path.write_text(
        f"MLX_SERVER_MODEL_PATH={tiny_model_dir}\n"
        f"MLX_SERVER_IPC_ADDRESS=ipc://{runtime}/engine.sock\n"
        f"PORT={free_port()}\n"
        "MLX_SERVER_WORKERS=2\n"
        "MLX_SERVER_THREADS=4\n"
        "MLX_SERVER_LOG_FORMAT=json\n"
    )
    return path


def base_url(env_file: Path) -> str:
    port = next(line.split("=", 1)[1] for line in env_file.read_text().splitlines() if line.startswith("PORT="))
    return f"http://127.0.0.1:{port}"


def status_of(url: str, method: str = "GET", body: dict | None = None) -> int | None:
    try:
        return httpx.request(method, url, json=body, timeout=10).status_code
    except httpx.HTTPError:
        return None


def wait_for(predicate, what: str, runs: list[Honcho], timeout_s: float = START_TIMEOUT_S) -> None:
    def check() -> bool:
        if predicate():
            return True
        for run in runs:
            if run.proc.poll() is not None:
                raise AssertionError(f"honcho exited {run.proc.returncode} waiting for {what}:\n{run.log_text()}")
        return False

    wait_until(check, what, timeout_s, POLL_S, context=lambda: "\n".join(run.log_text() for run in runs))


def test_honcho_runs_the_procfile_and_sigterm_stops_everything(env_file: Path, tmp_path: Path):
    base = base_url(env_file)
    honcho = Honcho(env_file, tmp_path / "honcho.log")
    try:
        wait_for(lambda: status_of(f"{base}/v1/models") == 200, "the server", [honcho])
        result = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30)
        assert result.status_code == 200, result.text
        assert result.json()["choices"][0]["finish_reason"] in ("stop", "length")
        completion = {"prompt": "Hi", "max_tokens": 5, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=completion, timeout=30) as r:
            assert r.status_code == 200
            assert "data: [DONE]" in list(r.iter_lines())
        tree = honcho.process_tree()
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "-m engine" in names and "-m gunicorn" in names
    except BaseException:
        honcho.kill()
        raise
    code = honcho.stop()
    assert code in (0, 143), honcho.log_text()  # honcho exits 143 (SIGTERM) once all stopped
    log = honcho.log_text()
    # JSON logs from every process kind (lines are prefixed by honcho: "HH:MM:SS name | ").
    roles = {json.loads(line.split("| ", 1)[1])["role"] for line in log.splitlines() if "| {" in line}
    assert {"engine", "web", "mlx-server"} <= roles, log


def test_web_waits_for_a_late_engine_and_survives_its_restart(env_file: Path, tmp_path: Path):
    base = base_url(env_file)
    chat = f"{base}/v1/chat/completions"
    web = Honcho(env_file, tmp_path / "web.log", "web")
    runs = [web]
    try:
        # No engine yet: the workers boot anyway and answer 503 with Retry-After.
        wait_for(lambda: status_of(f"{base}/health") == 200, "the web workers", runs)
        refused = httpx.post(chat, json=CHAT, timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"]
        assert refused.json()["error"]["code"] == "engine_unavailable"
        assert status_of(f"{base}/health/ready") == 503

        engine = Honcho(env_file, tmp_path / "engine.log", "engine")
        runs.append(engine)
        wait_for(lambda: status_of(chat, "POST", CHAT) == 200, "requests served once the engine is up", runs)
        assert engine.stop() in (0, 143)
        runs.remove(engine)
        wait_for(lambda: status_of(chat, "POST", CHAT) == 503, "503 while the engine is down", runs, 30)

        engine = Honcho(env_file, tmp_path / "engine2.log", "engine")
        runs.append(engine)
        wait_for(lambda: status_of(chat, "POST", CHAT) == 200, "requests served after the restart", runs)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert 'mlx_server_http_requests_total{method="POST",route="/v1/chat/completions",status="503"}' in metrics
    except BaseException:
        for run in runs:
            run.kill()
        raise
    for run in runs:
        assert run.stop() in (0, 143)
