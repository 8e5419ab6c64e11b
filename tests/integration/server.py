"""Child processes for tests (a real `mlx-server`, honcho, nginx): a log file each, stopped leaving nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.sse import sse_data
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
POLL_S = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlx_server_command(*args: str) -> list[str]:
    """The console script's code, run with this interpreter (works without install)."""
    return [sys.executable, "-m", "deploy.cli", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_SERVER_")}
    # The repo first; an existing PYTHONPATH (a --target install, as on the GPU host) kept after it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ChildProcess:
    """A command as a child process, its output in a log file; `stop()` leaves no process behind."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env or child_env(), stdout=self._log, stderr=subprocess.STDOUT
        )
        self._tree: list[psutil.Process] = []

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def process_tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:  # already exited (and reaped)
            return []

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the process; return its exit code once every process it started is gone."""
        tree = self._tree or self.process_tree()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        finally:
            _, alive = psutil.wait_procs(tree, timeout=STOP_TIMEOUT_S)
            for p in alive:
                p.kill()
            self._log.close()
        assert not alive, f"processes left behind: {alive}\n{self.log_text()}"
        return code

    def kill(self) -> None:
        """SIGKILL the whole tree, leaves first (a test that failed midway)."""
        for p in reversed(self.process_tree()):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(STOP_TIMEOUT_S)
        self._log.close()


class ServerProcess(ChildProcess):
    """`mlx-server MODEL --port P` as a child process, with its output in a log file."""

    def __init__(self, model_dir: Path, log_dir: Path, *extra_args: str, workers: int = 2) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [str(model_dir), "--port", str(self.port), "--workers", str(workers), *extra_args]
        super().__init__(mlx_server_command(*args), log_dir / f"mlx-server-{self.port}.log")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mlx-server exited {self.proc.returncode}:\n{self.log_text()}")
        try:
            return httpx.get(f"{self.base_url}/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> ServerProcess:
        wait_until(self.ready, "mlx-server to be ready", timeout_s, POLL_S, context=self.log_text)
        self._tree = self.process_tree()
        return self

    def __enter__(self) -> ServerProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None or self._tree:
            self.stop()


def long_stream(base: str, out: dict, no_eos: dict, timeout_s: float = 60) -> None:
    """Stream a long answer, one that runs until a fault ends it (bounded all the same by
    ``timeout_s``); record the events and when the stream started and ended."""
    payload = {
        "messages": [{"role": "user", "content": "go on forever"}],
        "max_tokens": 3500,
        "stream": True,
        "logit_bias": no_eos,
    }
    events = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=timeout_s) as r:
        for data in sse_data(r.iter_text()):
            events.append(data)
            out.setdefault("first_at", time.monotonic())
    out["events"] = events
    out["ended_at"] = time.monotonic()
