"""A sharded engine: two real ranks (ring backend on 127.0.0.1) against one process.

The group is started as the supervisor starts it (``mlx.launch ... -m engine``),
or rank by rank with the environment mlx.launch sets (MLX_RANK, MLX_HOSTFILE)
where a test needs each rank's own exit status (mlx.launch's says nothing).
The test talks to rank 0 over ZeroMQ as an HTTP worker does. The reference
is the same engine code (Scheduler) on the whole model in this process.
"""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import psutil
import pytest

from engine.group import GROUP_STEP_TIMEOUT_S
from engine.loading import load_model
from frontend.engine_client import EngineUnavailable
from frontend.zmq_client import ZmqEngineClient
from ipc import runtime
from ipc.messages import Constraint, Generate, SamplingParams
from ipc.sockets import default_ipc_address, make_private_runtime_dir
from tests.integration.server import REPO_ROOT, ChildProcess, child_env, free_port
from tests.unit.defaults import CLIENT_LIMITS, DEFAULTS
from tests.unit.scheduler_client import SchedulerClient
from tests.waiting import wait_until

MLX_LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
RANKS = 2
# Two ranks load next to other tests on a 2-core machine.
START_TIMEOUT_S = 120.0
# How long a rank may take to exit after its group failed or was stopped (bounded waits, not timings).
EXIT_TIMEOUT_S = 30.0
GREEDY = SamplingParams(temperature=0.0)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def _gen(rid: str, prompt: list[int], max_tokens: int, **kw: object) -> Generate:
    kw.setdefault("sampling", GREEDY)
    return Generate(request_id=rid, prompt_token_ids=prompt, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


ALONE = [_gen("alone", list(range(30, 52)), 16)]
# Different prompt and output lengths in one batch; seeded sampling and a grammar among them.
BATCH = [
    _gen("short", [7, 8, 9], 12),
    _gen("medium", list(range(100, 117)), 20),
    _gen("long", list(range(200, 260)), 9),
    _gen("seeded", list(range(300, 311)), 14, sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=42)),
    _gen("json", list(range(400, 406)), 40, constraint=Constraint(kind="json_schema", text=json.dumps(SCHEMA))),
]


def _consecutive_free_ports() -> int:
    """A port P with P+1 free too: mlx.launch's ring takes one port per rank from P up."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def _config_env(model_dir: Path, mode: str, adapter_dir: Path | None) -> tuple[str, dict[str, str]]:
    address = default_ipc_address(make_private_runtime_dir())
    settings = DEFAULTS.model_copy(update={"model_path": model_dir})
    config = msgspec.structs.replace(
        settings.runtime_config(address),
        adapter_path=None if adapter_dir is None else str(adapter_dir),
        distributed=runtime.DistributedConfig(mode=mode, backend="ring", ranks=RANKS, hostfile=None),  # type: ignore[arg-type]
    )
    return address, child_env({runtime.CONFIG_ENV: runtime.encode(config)})


class Group:
    """A running group: the client on rank 0, and the processes to signal."""

    def __init__(self, client: ZmqEngineClient, launcher: ChildProcess | None, ranks: list[ChildProcess]) -> None:
        self.client = client
        self.launcher = launcher
        self.ranks = ranks

    def rank_pids(self) -> dict[int, int]:
        """rank -> pid (under mlx.launch: its children, by the MLX_RANK it gave them)."""
        if self.launcher is None:
            return {r: p.proc.pid for r, p in enumerate(self.ranks)}
        children = psutil.Process(self.launcher.proc.pid).children(recursive=True)
        return {int(c.environ()["MLX_RANK"]): c.pid for c in children if "MLX_RANK" in c.environ()}


@contextmanager
def start_group(
    model_dir: Path, mode: str, logs: Path, adapter_dir: Path | None = None, by_hand: bool = False
) -> Iterator[Group]:
    address, env = _config_env(model_dir, mode, adapter_dir)
    port = _consecutive_free_ports()
    engine = ["-m", "engine", "--restarts", "0"]
    launcher, ranks = None, []
    if by_hand:
        hostfile = logs / f"hosts-{port}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(RANKS)]))
        for r in range(RANKS):
            rank_env = {**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}
            ranks.append(ChildProcess([sys.executable, *engine], logs / f"rank{r}-{port}.log", rank_env))
        log = ranks[0]
    else:
        argv = [MLX_LAUNCH, "--backend", "ring", "-n", str(RANKS), "--starting-port", str(port)]
        launcher = ChildProcess([*argv, "--python", sys.executable, "--", *engine], logs / f"group-{port}.log", env)
        log = launcher
    everyone = [p for p in (launcher, *ranks) if p is not None]
    try:
        client = ZmqEngineClient(address, **CLIENT_LIMITS)

        def ready() -> bool:
            for p in everyone:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.proc.args} exited {p.proc.returncode}:\n{p.log_text()}")
            return client.wait_ready(0.5)

        wait_until(ready, "the group's rank 0 to answer", START_TIMEOUT_S, context=log.log_text)
        group = Group(client, launcher, ranks)
        wait_until(lambda: len(group.rank_pids()) == RANKS, "both ranks to show", EXIT_TIMEOUT_S)
        yield group
    finally:
        for p in everyone:
            if p.proc.poll() is None:
                p.kill()


def _run(client: ZmqEngineClient, requests: list[Generate]) -> dict[str, list[int]]:
    """Submit every request before reading any (one batch); each one's tokens."""
    streams = [client.submit(r) for r in requests]
    out = {}
    for stream in streams:
        deltas = list(stream)
        assert deltas[-1].finish_reason in ("stop", "length"), deltas[-1]
        out[stream.request_id] = [t for d in deltas for t in d.token_ids]
    return out


REQUESTS = {"alone": ALONE, "batch": BATCH}


@functools.lru_cache(maxsize=4)
def _reference(model_dir: Path, adapter_dir: Path | None, requests: str) -> dict[str, list[int]]:
    """The same requests (REQUESTS[requests]), together, on one process's whole model."""
    client = SchedulerClient(load_model(str(model_dir), None if adapter_dir is None else str(adapter_dir)))
    streams = [client.submit(r) for r in REQUESTS[requests]]
    return {s.request_id: [t for d in s for t in d.token_ids] for s in streams}


def _gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


@pytest.fixture()
def logs(tmp_path: Path) -> Path:
    return tmp_path


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_group_output_equals_one_process(mode, tiny_qwen2_dir, logs):
    """Greedy alone and in a batch, seeded sampling and a json_schema grammar: the same tokens."""
    with start_group(tiny_qwen2_dir, mode, logs) as group:
        alone = _run(group.client, ALONE)
        batch = _run(group.client, BATCH)
        status = group.client.status()
    assert alone == _reference(tiny_qwen2_dir, None, "alone")
    assert batch == _reference(tiny_qwen2_dir, None, "batch")
    assert status.group is not None
    assert (status.group.mode, status.group.backend) == (mode, "ring")
    assert [r.rank for r in status.group.ranks] == list(range(RANKS))
    assert all(r.host == socket.gethostname() and r.active_memory_bytes > 0 for r in status.group.ranks)


def test_group_with_a_lora_adapter_equals_one_process(tiny_qwen2_dir, tiny_qwen2_adapter_dir, logs):
    """The adapter is fused into the weights before sharding: same greedy tokens as the adapter on one process."""
    with start_group(tiny_qwen2_dir, "tensor", logs, adapter_dir=tiny_qwen2_adapter_dir) as group:
        batch = _run(group.client, BATCH)
    assert batch == _reference(tiny_qwen2_dir, tiny_qwen2_adapter_dir, "batch")
    assert batch != _reference(tiny_qwen2_dir, None, "batch")  # the adapter changes the output


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_lost_follower_ends_rank_0_and_its_requests(fault, tiny_qwen2_dir, logs):
    """A follower killed (its connections close) or hung (SIGSTOP: rank 0 waits in a
    collective until the watchdog's bound: a broadcast's, or a decode step's when the
    follower stopped inside one) ends rank 0 with a non-zero exit, and the request in
    flight fails with the engine-dead error: the supervisor restarts the group."""
    with start_group(tiny_qwen2_dir, "pipeline", logs, by_hand=True) as group:
        rank0, rank1 = group.ranks
        stream = group.client.submit(_gen("in-flight", [5, 6, 7], 3000, stop_token_ids=[]))
        deltas = iter(stream)
        next(deltas)
        rank1.proc.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        code = rank0.proc.wait(GROUP_STEP_TIMEOUT_S + EXIT_TIMEOUT_S)
        assert code != 0, rank0.log_text()
        assert "ERROR" in rank0.log_text()
        with pytest.raises(EngineUnavailable):
            for _ in deltas:
                pass


@pytest.mark.parametrize("target", ["rank 0", "mlx.launch"])
def test_sigterm_leaves_no_process_behind(target, tiny_qwen2_dir, logs):
    """SIGTERM to rank 0: it stops its followers (GroupStop); to mlx.launch, which
    dies without passing it on: its ranks see their parent gone and leave."""
    with start_group(tiny_qwen2_dir, "tensor", logs) as group:
        assert group.launcher is not None
        pids = group.rank_pids()
        _run(group.client, ALONE)
        victim = pids[0] if target == "rank 0" else group.launcher.proc.pid
        psutil.Process(victim).send_signal(signal.SIGTERM)
        group.launcher.proc.wait(EXIT_TIMEOUT_S)
        wait_until(lambda: _gone(list(pids.values())), "every rank to exit", EXIT_TIMEOUT_S)
    if target == "rank 0":
        text = group.launcher.log_text()
        assert "follower stopped" in text and "engine stopped" in text, text


def test_models_that_cannot_shard_are_refused_with_one_line(
    tiny_model_dir, tiny_qwen2_dir, tiny_qwen2_adapter_dir, tmp_path
):
    """The pre-check the supervisor runs, and the engine's own check at start: exit 2, one line."""

    def check(*args: str) -> tuple[int, str]:
        done = _python("-m", "engine.sharding", *args)
        return done.returncode, done.stderr.strip()

    assert check(str(tiny_qwen2_dir), "--mode", "pipeline", "--ranks", "2") == (0, "")
    code, line = check(str(tiny_model_dir), "--mode", "pipeline", "--ranks", "2")
    assert code == 2 and "cannot be split into a pipeline" in line and "\n" not in line
    code, line = check(str(tiny_qwen2_dir), "--mode", "tensor", "--ranks", "3")
    assert code == 2 and "divisible by 3" in line
    code, line = check(str(tiny_qwen2_dir), "--mode", "pipeline", "--ranks", "4")
    assert code == 2 and "at least 4 layers" in line
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 64, "bits": 4}}))
    code, line = check(str(quantized), "--mode", "tensor", "--ranks", "2", "--adapter", str(tiny_qwen2_adapter_dir))
    assert code == 2 and "quantized" in line

    # The engine checks again before joining the group (no mlx.launch needed to see it refuse).
    _, env = _config_env(tiny_model_dir, "pipeline", None)
    done = _python("-m", "engine", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("engine: error: llama models cannot be split")


def _python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env or child_env(), capture_output=True, text=True, timeout=120
    )
