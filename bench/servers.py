"""Start, watch and stop the HTTP servers under test.

Each server runs in its own session (process group), so stopping it can never
reach anything this benchmark did not start; SIGTERM first (our supervisor
drains), SIGKILL of the group only if it does not exit in time. A sharded
server is a group of ranks: every process of its sessions that outlives the
stop is named in `ServerProcess.leftovers`, then killed.
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
from typing import get_args

import httpx
import psutil

from deploy.engine_group import port_flag
from ipc.runtime import DistributedMode
from tests.integration.server import child_env

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


def free_port_run(count: int, tries: int = 50) -> int:
    """A port P with P .. P+count-1 all free now (mlx.launch's ring takes one port per rank)."""
    for _ in range(tries):
        start = free_port()
        if start + count > 65536:
            continue
        try:
            for port in range(start, start + count):
                with socket.socket() as s:
                    s.bind((HOST, port))
        except OSError:
            continue
        return start
    raise RuntimeError(f"no run of {count} free ports on {HOST} in {tries} tries")


# The server setting's modes, and the backends that run every rank on this machine
# (ring over 127.0.0.1; nccl, one NVIDIA GPU per rank): jaccl needs Thunderbolt between Macs.
DISTRIBUTED_MODES: tuple[str, ...] = get_args(DistributedMode)
LOCAL_BACKENDS = ("ring", "nccl")


@dataclass(frozen=True)
class Sharding:
    """One model over `ranks` processes of this machine (mlx.distributed on 127.0.0.1)."""

    ranks: int
    mode: str  # "tensor" (model.shard) or "pipeline" (layers split over the ranks)
    backend: str = "ring"  # or "nccl": one NVIDIA GPU per rank

    def describe(self) -> str:
        return f"{self.ranks} ranks, {self.mode}, {self.backend} on {HOST}"


def mlx_launch_exe() -> str:
    """mlx's launcher: the console script beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("mlx.launch")
    if beside.is_file():
        return str(beside)
    found = shutil.which("mlx.launch")
    if found is None:
        raise RuntimeError("mlx.launch not found beside this Python or on PATH (it comes with mlx)")
    return found


def mlx_launch_argv(sharding: Sharding, ring_port: int, command: list[str], launcher: str) -> list[str]:
    """`mlx.launch` running `command` as `sharding.ranks` local ranks of one group.

    Ring: ranks listen on ring_port, ring_port+1, ...; nccl: they meet at ring_port,
    rank i on GPU i. mlx.launch sets MLX_RANK (and the backend's variables) for each
    and runs them as its own children."""
    return [launcher, "--backend", sharding.backend, "-n", str(sharding.ranks), port_flag(sharding.backend),
            str(ring_port), "--", *command]  # fmt: skip


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
    # SIGTERM the whole process group, not only the main process: mlx.launch dies
    # on SIGTERM without passing it on, which would leave its ranks to SIGKILL.
    signal_group: bool = False
    # stdin a pipe kept open and never written, as a terminal that nobody types into:
    # mlx.launch relays its stdin to the ranks, and at /dev/null's EOF its relay loop
    # would spin on a core of its own (ours' supervisor gives its mlx.launch the same).
    stdin_pipe: bool = False


def _rank(proc: psutil.Process) -> int:
    """The process's MLX_RANK (0 without one: not part of a sharded group)."""
    try:
        return int(proc.environ().get("MLX_RANK", "0"))
    except (psutil.Error, ValueError):
        return 0


def _with_rank(label: Callable[[psutil.Process], str]) -> Callable[[psutil.Process], str]:
    """`label`, with " rank N" for ranks above 0, so rank 0 keeps the name --profile looks for."""

    def ranked(proc: psutil.Process) -> str:
        base = label(proc)
        rank = _rank(proc)
        return f"{base} rank {rank}" if rank else base

    return ranked


def _is_launcher(cmd: str) -> bool:
    """mlx.launch, by its console script or its module (it relays its ranks' output)."""
    return "mlx.launch" in cmd or "_distributed_utils.launch" in cmd


def _mlx_lm_label(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    return "launcher" if _is_launcher(cmd) else "server"


def mlx_lm_spec(
    model_dir: Path, max_concurrency: int, extra: list[str], sharding: Sharding | None = None,
    launcher: str | None = None,
) -> ServerSpec:  # fmt: skip
    """mlx_lm.server; sharded, its ranks under `mlx.launch` (its documented way), `--pipeline` for
    pipeline mode (tensor parallelism is its default in a group)."""
    # decode- and prompt-concurrency at the largest load: mlx_lm.server batches at
    # most decode-concurrency streams (default 32) and prefills prompt-concurrency
    # prompts at a time (default 8); the raw ceiling gets the same batch sizes.
    flags = [
        "--decode-concurrency", str(max_concurrency),
        "--prompt-concurrency", str(max_concurrency),
        # INFO logs every request's prompt progress; not what a loaded server runs with.
        "--log-level", "WARNING",
        *(["--pipeline"] if sharding is not None and sharding.mode == "pipeline" else []),
        *extra,
    ]  # fmt: skip

    def server(port: int) -> list[str]:
        return [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--host", HOST,
                "--port", str(port), *flags]  # fmt: skip

    if sharding is None:
        return ServerSpec(
            name="mlx_lm",
            argv=server,
            model_field="default_model",  # the id mlx_lm.server maps to --model
            # Its /v1/models scans the Hugging Face cache and fails where there is none.
            ready_path="/health",
            settings={"flags": " ".join(flags)},
        )
    exe = launcher or mlx_launch_exe()
    return ServerSpec(
        name="mlx_lm",
        argv=lambda port: mlx_launch_argv(sharding, free_port_run(sharding.ranks), server(port), exe),
        model_field="default_model",
        ready_path="/health",
        label=_with_rank(_mlx_lm_label),
        settings={"flags": f"under mlx.launch --backend {sharding.backend} -n {sharding.ranks}; {' '.join(flags)}"},
        signal_group=True,
        stdin_pipe=True,
    )


def _ours_label(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    if _is_launcher(cmd):
        return "launcher"
    if "engine" in cmd:
        return "engine"
    if "gunicorn" in cmd or "frontend" in cmd:
        return "http"
    return "supervisor"


def ours_spec(model_dir: Path, extra: list[str], sharding: Sharding | None = None) -> ServerSpec:
    """mlx-server; sharded, with its own distributed settings (its supervisor starts the ranks)."""
    shard = [] if sharding is None else ["--distributed-ranks", str(sharding.ranks),
                                         "--distributed-mode", sharding.mode,
                                         "--distributed-backend", sharding.backend]  # fmt: skip
    flags = [*shard, *extra]
    return ServerSpec(
        name="ours",
        argv=lambda port: [sys.executable, "-m", "deploy.cli", str(model_dir), "--port", str(port), *flags],
        label=_ours_label if sharding is None else _with_rank(_ours_label),
        profile_label="engine",
        settings={"flags": " ".join(flags) or "defaults"},
    )


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
            env=child_env(),  # no stray MLX_SERVER_*: ours' settings come from its command line
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if spec.stdin_pipe else subprocess.DEVNULL,
            start_new_session=True,
        )
        self._known: dict[int, psutil.Process] = {}
        # "pid command" of each process of the server still alive after the stop's grace (then killed).
        self.leftovers: list[str] = []

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

    def _sessions(self) -> set[int]:
        """Session ids of the server's processes (its own, and any its supervisor made), never ours."""
        own = os.getsid(0)
        sids = set()
        for p in self._known.values():
            try:
                sids.add(os.getsid(p.pid))
            except OSError:
                continue
        return sids - {own}

    def _strays(self, sessions: set[int]) -> list[psutil.Process]:
        """Live processes of those sessions that the remembered tree misses (e.g. ranks of a
        group restarted after the last look, or orphaned by a launcher that died)."""
        out = []
        for p in psutil.process_iter():
            if p.pid in self._known:
                continue
            try:
                if os.getsid(p.pid) in sessions:
                    out.append(p)
            except OSError:
                continue
        return out

    def stop(self) -> None:
        """SIGTERM and wait; then SIGKILL whatever of the server's own processes is left,
        naming each in `leftovers`."""
        self._remember_tree()
        sessions = self._sessions() | {self.proc.pid}
        if self.proc.poll() is None:
            if self.spec.signal_group:
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        # psutil.Process checks the create time, so a reused pid is never hit.
        watched = [*self._known.values(), *self._strays(sessions)]
        _, alive = psutil.wait_procs(watched, timeout=CHILD_GRACE_S)
        for p in alive:
            try:
                self.leftovers.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)  # gone (or a zombie) when stop returns
        if self.proc.stdin is not None:
            self.proc.stdin.close()
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

    `per_gpu` is each GPU's mean by index, `pct` GPU 0's (the GPU of an unsharded
    server); None / empty without nvidia-smi (CPU machines) or without samples. A
    sample is the share of the last period in which a kernel ran: it tells a
    GPU-bound step (near 100) from one that waits on the host (well under)."""

    PERIOD_MS = 200

    def __init__(self) -> None:
        self.pct: float | None = None
        self.per_gpu: list[float] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusy:
        exe = shutil.which("nvidia-smi")
        if exe:
            try:
                self._proc = subprocess.Popen(
                    [exe, "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", f"-lms={self.PERIOD_MS}"],
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
        self.per_gpu = gpu_means(out)
        self.pct = self.per_gpu[0] if self.per_gpu else None


def gpu_means(samples: str) -> list[float]:
    """Each GPU's mean utilization from nvidia-smi's "index, percent" lines (by index)."""
    by_gpu: dict[int, list[float]] = {}
    for line in samples.splitlines():
        try:
            index, value = (field.strip() for field in line.split(","))
            by_gpu.setdefault(int(index), []).append(float(value))
        except ValueError:
            continue
    means = []
    for index in sorted(by_gpu):
        values = by_gpu[index]
        values = values[1:] if len(values) > 1 else values  # the first sample covers the time before the block
        means.append(sum(values) / len(values))
    return means


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
