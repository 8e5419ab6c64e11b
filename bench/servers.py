"""Start, watch and stop the HTTP servers under test.

Each server runs in its own session (process group), so stopping it can never
reach anything this benchmark did not start; SIGTERM first (our supervisor
drains), SIGKILL of the group only if it does not exit in time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
READY_POLL_S = 0.25
STOP_TIMEOUT_S = 30.0
CHILD_GRACE_S = 5.0  # after the main process exits, its children get this long
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: Callable[[int], list[str]]  # port -> command line
    # The "model" field to send; None: the first id that GET /v1/models lists.
    model_field: str | None = None
    ready_path: str = "/v1/models"  # answers 200 once the server takes requests
    # process -> label for the CPU breakdown (engine vs HTTP workers, ...)
    label: Callable[[psutil.Process], str] = lambda p: "server"
    settings: dict[str, str] = field(default_factory=dict)  # shown in the report
    profile_label: str = "server"  # the process that --profile records (the one holding the model)


def mlx_lm_spec(model_dir: Path, max_concurrency: int, extra: list[str]) -> ServerSpec:
    # decode- and prompt-concurrency at the largest load: mlx_lm.server batches at
    # most decode-concurrency streams (default 32) and prefills prompt-concurrency
    # prompts at a time (default 8); the raw ceiling gets the same batch sizes.
    flags = [
        "--decode-concurrency", str(max_concurrency),
        "--prompt-concurrency", str(max_concurrency),
        # INFO logs every request's prompt progress; not what a loaded server runs with.
        "--log-level", "WARNING",
        *extra,
    ]  # fmt: skip
    return ServerSpec(
        name="mlx_lm",
        argv=lambda port: [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model_dir),
            "--host",
            HOST,
            "--port",
            str(port),
            *flags,
        ],  # fmt: skip
        model_field="default_model",  # the id mlx_lm.server maps to --model
        # Its /v1/models scans the Hugging Face cache and fails where there is none.
        ready_path="/health",
        settings={"flags": " ".join(flags)},
    )


def _ours_label(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    if "engine" in cmd:
        return "engine"
    if "gunicorn" in cmd or "frontend" in cmd:
        return "http"
    return "supervisor"


def ours_spec(model_dir: Path, extra: list[str]) -> ServerSpec:
    return ServerSpec(
        name="ours",
        argv=lambda port: [sys.executable, "-m", "deploy.cli", str(model_dir), "--port", str(port), *extra],
        label=_ours_label,
        profile_label="engine",
        settings={"flags": " ".join(extra) or "defaults"},
    )


def _child_env() -> dict[str, str]:
    # Our own settings come from the command line only, never a stray MLX_SERVER_*.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_SERVER_")}
    # The repo first; an existing PYTHONPATH (a --target install, as on the GPU host) kept after it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """One server as a child process; use as a context manager so it always stops."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{spec.name}-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            spec.argv(self.port),
            cwd=REPO_ROOT,
            env=_child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._known: dict[int, psutil.Process] = {}

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> str:
        """Wait for GET /v1/models to answer 200; return the model field to send."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                resp = httpx.get(f"{self.base_url}{self.spec.ready_path}", timeout=2.0)
                if resp.status_code == 200:
                    self._remember_tree()
                    return self.spec.model_field or resp.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
            time.sleep(READY_POLL_S)
        raise RuntimeError(f"{self.spec.name} not ready in {timeout_s:g} s:\n{self.log_tail()}")

    def _remember_tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return list(self._known.values())
        for p in tree:
            self._known.setdefault(p.pid, p)
        return tree

    def cpu_seconds(self) -> dict[int, tuple[str, float]]:
        """pid -> (label, user+system CPU seconds so far) for every live process of the server."""
        out: dict[int, tuple[str, float]] = {}
        for p in self._remember_tree():
            try:
                t = p.cpu_times()
                out[p.pid] = (self.spec.label(p), t.user + t.system)
            except psutil.Error:
                continue
        return out

    def pids(self, label: str) -> list[int]:
        """Live processes of the server with this label (e.g. our "engine")."""
        return [p.pid for p in self._remember_tree() if p.is_running() and self.spec.label(p) == label]

    def thread_seconds(self) -> dict[int, tuple[str, float]]:
        """thread id -> (process label, user+system CPU seconds so far) for every thread of the server."""
        out: dict[int, tuple[str, float]] = {}
        for p in self._remember_tree():
            try:
                label = self.spec.label(p)
                for t in p.threads():
                    out[t.id] = (label, t.user_time + t.system_time)
            except psutil.Error:
                continue
        return out

    def stop(self) -> None:
        """SIGTERM and wait; then SIGKILL whatever of the server's own tree is left."""
        self._remember_tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        # psutil.Process checks the create time, so a reused pid is never hit.
        _, alive = psutil.wait_procs(list(self._known.values()), timeout=CHILD_GRACE_S)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all cores, since boot)."""
    t = psutil.cpu_times()
    # Linux counts guest time inside user/nice already; iowait is idle waiting.
    skip = t.idle + sum(getattr(t, name, 0.0) for name in ("iowait", "guest", "guest_nice"))
    return sum(t) - skip


def wait_for_quiet(max_wait_s: float, threshold_cores: float, window_s: float = 0.5) -> float:
    """Wait (at most max_wait_s) for a window in which the whole machine is nearly idle;
    return the busy cores of the last window. Called between runs, when the target
    is idle too: on a shared 2-core machine, one neighbour's test run halves a result."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0 = busy_cpu_seconds()
        time.sleep(window_s)
        cores = (busy_cpu_seconds() - busy0) / window_s
        if cores <= threshold_cores or time.monotonic() >= deadline:
            return cores


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per label between two readings; processes born in between count from zero."""
    out: dict[str, float] = {}
    for pid, (label, secs) in after.items():
        prev = before.get(pid, (label, 0.0))[1]
        out[label] = out.get(label, 0.0) + max(secs - prev, 0.0)
    return out


def busiest_thread(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """Per label, the CPU seconds of its busiest single thread between two readings."""
    out: dict[str, float] = {}
    for tid, (label, secs) in after.items():
        used = max(secs - before.get(tid, (label, 0.0))[1], 0.0)
        out[label] = max(out.get(label, 0.0), used)
    return out


class GpuBusy:
    """Mean GPU utilization over a `with` block, sampled by `nvidia-smi -lms` in the background.

    `pct` is None without nvidia-smi (CPU machines) or without samples. A sample is
    the share of the last period in which a kernel ran: it tells a GPU-bound
    step (near 100) from one that waits on the host (well under)."""

    PERIOD_MS = 200

    def __init__(self) -> None:
        self.pct: float | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusy:
        exe = shutil.which("nvidia-smi")
        if exe:
            try:
                self._proc = subprocess.Popen(
                    [exe, "--id=0", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={self.PERIOD_MS}"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                )  # fmt: skip
            except OSError:
                self._proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        values = []
        for line in out.splitlines():
            try:
                values.append(float(line.strip()))
            except ValueError:
                continue
        # The first sample covers the time before the block.
        values = values[1:] if len(values) > 1 else values
        self.pct = sum(values) / len(values) if values else None


class Profiler:
    """`py-spy record` of one process over a `with` block, as collapsed stacks (flame graph input).

    Sampling is --nonblocking (the process is never stopped), so the measured run
    pays only for the cores py-spy itself takes. Does nothing without py-spy."""

    RATE_HZ = 250

    def __init__(self, pid: int | None, path: Path) -> None:
        self._pid, self._path = pid, path
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Profiler:
        exe = os.environ.get("PY_SPY") or shutil.which("py-spy")
        if exe and self._pid:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._proc = subprocess.Popen(
                [exe, "record", "--nonblocking", "--rate", str(self.RATE_HZ), "--format", "raw",
                 "--output", str(self._path), "--pid", str(self._pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
