"""Start and stop a real `mlx-server` (supervisor + engine + gunicorn) for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import psutil

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


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_SERVER_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ServerProcess:
    """`mlx-server MODEL --port P` as a child process, with its output in a log file."""

    def __init__(self, model_dir: Path, log_dir: Path, *extra_args: str, workers: int = 2) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"mlx-server-{self.port}.log"
        args = [str(model_dir), "--port", str(self.port), "--workers", str(workers), *extra_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            mlx_server_command(*args),
            cwd=REPO_ROOT,
            env=child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._tree: list[psutil.Process] = []

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx-server exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.base_url}/health/ready", timeout=2).status_code == 200:
                    self._tree = self.process_tree()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(POLL_S)
        raise RuntimeError(f"mlx-server not ready in {timeout_s} s:\n{self.log_text()}")

    def process_tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:  # already exited (and reaped)
            return []

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the supervisor; return its exit code once every process it started is gone."""
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
        assert not alive, f"processes left behind: {alive}"
        return code

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None or self._tree:
            self.stop()
