"""The sharded engine's group: hostfile checks, mlx.launch's command line, ports, and a group
of real processes (a stand-in launcher, no mlx) killed and stopped as a whole."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import textwrap
from pathlib import Path

import msgspec
import psutil
import pytest
import zmq

from deploy import engine_group
from deploy.engine_group import EngineGroup, RankZeroWatch, free_port_range, launch_command, remote_config
from deploy.hostfile import check_backend, read_hostfile
from ipc import codec, runtime
from ipc.messages import EngineStatus, StatusQuery
from ipc.sockets import bind_router
from tests.unit.defaults import DEFAULTS
from tests.waiting import wait_until

RING_2 = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "mac-b", "ips": ["10.0.0.2"]}]


def write(tmp_path: Path, data: object, name: str = "hosts.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def config(group: runtime.DistributedConfig | None, api_keys: tuple[str, ...] = ()) -> runtime.RuntimeConfig:
    return runtime.RuntimeConfig(
        model_path="/models/m",
        adapter_path=None,
        distributed=group,
        ipc_address="ipc:///tmp/none.sock",
        log_level="info",
        log_format="text",
        engine=DEFAULTS.engine_config(),
        web=runtime.WebConfig(
            default_max_tokens=16,
            request_timeout_s=60.0,
            max_queued_requests=8,
            api_keys=api_keys,
            cors_origins=(),
            ui=False,
            drain_flag=None,
            supervisor_pid=None,
        ),
    )


# ---------------------------------------------------------------- hostfile


def test_hostfile_object_and_list_forms(tmp_path: Path) -> None:
    listed = read_hostfile(write(tmp_path, RING_2))
    wrapped = read_hostfile(write(tmp_path, {"backend": "ring", "envs": ["A=1"], "hosts": RING_2}, "b.json"))
    assert listed.hosts == wrapped.hosts
    assert [h.ssh for h in listed.hosts] == ["127.0.0.1", "mac-b"]
    assert (listed.backend, wrapped.backend) == (None, "ring")
    assert listed.ring_ports() == 2
    assert not listed.all_local
    check_backend(listed, "ring")


@pytest.mark.parametrize(
    "data, needle",
    [
        ("{not json", "not valid JSON"),
        ({"hosts": "mac-a"}, "list of hosts"),
        ([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}], "at least 2"),
        ([{"ips": ["10.0.0.1"]}, {"ssh": "b"}], "host 0 has no `ssh`"),
        ([{"ssh": "a", "ip": ["10.0.0.1"]}, {"ssh": "b"}], "unknown key `ip`"),
        ({"hosts": RING_2, "backnd": "ring"}, "unknown key `backnd`"),
        ([{"ssh": "a", "ips": "10.0.0.1"}, {"ssh": "b"}], "list of non-empty strings"),
    ],
)
def test_hostfile_that_mlx_launch_could_not_use(tmp_path: Path, data: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("`", ".")):
        read_hostfile(write(tmp_path, data))


def test_missing_hostfile(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read hostfile"):
        read_hostfile(tmp_path / "nope.json")


def test_ring_needs_ip_addresses(tmp_path: Path) -> None:
    no_ips = read_hostfile(write(tmp_path, [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "mac-b"}]))
    with pytest.raises(ValueError, match="host 1 .mac-b. has no `ips`"):
        check_backend(no_ips, "ring")
    names = read_hostfile(write(tmp_path, [{"ssh": "a", "ips": ["mac-a.local"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]))
    with pytest.raises(ValueError, match="not an IP address"):
        check_backend(names, "ring")


def test_jaccl_needs_a_full_rdma_mesh(tmp_path: Path) -> None:
    good = [
        {"ssh": "127.0.0.1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en2"]},
        {"ssh": "mac-b", "ips": ["10.0.0.2"], "rdma": ["rdma_en2", None]},
    ]
    check_backend(read_hostfile(write(tmp_path, good)), "jaccl")
    one_way = [dict(good[0]), {**good[1], "rdma": [None, None]}]
    with pytest.raises(ValueError, match="host 1 .mac-b. has no RDMA device towards host 0"):
        check_backend(read_hostfile(write(tmp_path, one_way)), "jaccl")
    short = [{**good[0], "rdma": [None]}, good[1]]
    with pytest.raises(ValueError, match="lists 1 RDMA devices for 2 hosts"):
        check_backend(read_hostfile(write(tmp_path, short)), "jaccl")


def test_backend_named_in_the_hostfile_must_match(tmp_path: Path) -> None:
    hostfile = read_hostfile(write(tmp_path, {"backend": "jaccl", "hosts": RING_2}))
    with pytest.raises(ValueError, match="names backend 'jaccl' but distributed_backend is 'ring'"):
        check_backend(hostfile, "ring")


# ---------------------------------------------------------------- mlx.launch's command line


def test_launch_command_for_ranks_on_this_machine() -> None:
    group = runtime.DistributedConfig(mode="tensor", backend="ring", ranks=2, hostfile=None)
    command = launch_command(group, 21000, 3, None)
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    assert command[:4] == [sys.executable, "-m", "deploy.group_launch", launcher]
    assert command[4:] == [
        "--backend", "ring", "-n", "2", "--starting-port", "21000", "--python", sys.executable,
        "--", "-m", "engine", "--restarts", "3",
    ]  # fmt: skip


def test_launch_command_for_nccl_names_its_rendezvous_port() -> None:
    # mlx.launch gives rank i of `-n N` the GPU CUDA_VISIBLE_DEVICES=i and meets at NCCL_PORT.
    group = runtime.DistributedConfig(mode="tensor", backend="nccl", ranks=2, hostfile=None)
    command = launch_command(group, 21000, 0, None)
    assert command[4:10] == ["--backend", "nccl", "-n", "2", "--nccl-port", "21000"]
    assert "--starting-port" not in command


def test_nccl_needs_rank_zeros_ip(tmp_path: Path) -> None:
    check_backend(read_hostfile(write(tmp_path, RING_2)), "nccl")
    named = read_hostfile(write(tmp_path, [{"ssh": "gpu-a"}, {"ssh": "gpu-b", "ips": ["10.0.0.2"]}]))
    with pytest.raises(ValueError, match="host 0 .gpu-a. has no `ips`: nccl"):
        check_backend(named, "nccl")


def test_launch_command_for_a_hostfile_carries_the_config_to_remote_hosts(tmp_path: Path) -> None:
    path = str(write(tmp_path, RING_2))
    group = runtime.DistributedConfig(mode="pipeline", backend="ring", ranks=2, hostfile=path)
    encoded = remote_config(config(group, api_keys=("secret-key",)))
    assert encoded is not None and "secret-key" not in encoded  # command lines are visible to ps
    assert runtime.from_environ({runtime.CONFIG_ENV: encoded}).distributed == group
    command = launch_command(group, 21000, 0, encoded)
    assert command[command.index("--hostfile") + 1] == path
    assert command[command.index("--env") + 1] == f"{runtime.CONFIG_ENV}={encoded}"
    assert "-n" not in command


def test_an_all_local_hostfile_needs_no_config_on_the_command_line(tmp_path: Path) -> None:
    local = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2
    group = runtime.DistributedConfig(mode="tensor", backend="ring", ranks=2, hostfile=str(write(tmp_path, local)))
    assert remote_config(config(group)) is None
    assert remote_config(config(None)) is None


def test_free_port_range_skips_a_busy_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        taken = busy.getsockname()[1]
        # The first draw lands on the busy port; the range picked must avoid it.
        monkeypatch.setattr(engine_group, "RING_PORTS", range(taken - 1, taken + 400))
        first = free_port_range(3, random.Random(0))
        assert taken not in range(first, first + 3)


# ---------------------------------------------------------------- the group's processes

# A stand-in for mlx.launch: two "ranks" in its process group, one of which ignores SIGTERM
# (mlx.launch would wait for it forever); it prints the pids, then waits.
FAKE_LAUNCHER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    codes = ("import time; print('up', flush=True); time.sleep(600)", stubborn)
    ranks = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env={**os.environ, "MLX_RANK": str(i)})
             for i, code in enumerate(codes)]
    for r in ranks:
        r.stdout.readline()  # started (and the stubborn one ignores SIGTERM)
    print(" ".join(str(r.pid) for r in ranks), flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)  # as mlx.launch after a rank failed: exit 0, other ranks maybe still there
    time.sleep(600)
    """
)


def fake_group(tmp_path: Path, behaviour: str) -> tuple[EngineGroup, list[psutil.Process]]:
    pids_file = tmp_path / "pids"

    def launch(group: runtime.DistributedConfig, port: int, restarts: int, remote: str | None) -> list[str]:
        script = f"import sys; sys.stdout = open({str(pids_file)!r}, 'w')\n" + FAKE_LAUNCHER
        return [sys.executable, "-c", script, behaviour]

    group = EngineGroup(
        config(runtime.DistributedConfig(mode="tensor", backend="ring", ranks=2, hostfile=None)), {}, launch
    )
    launcher = psutil.Process(group.start(0).pid)
    pids = wait_until(lambda: pids_file.exists() and pids_file.read_text().split(), "the fake ranks")
    return group, [launcher, *(psutil.Process(int(pid)) for pid in pids)]


def gone(procs: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def test_stop_terms_then_kills_every_process_of_the_group(tmp_path: Path) -> None:
    group, procs = fake_group(tmp_path, "wait")
    assert group.dead() is None
    group.stop(timeout_s=1.0)
    wait_until(lambda: gone(procs), "every process of the group to be gone", timeout_s=10)


def test_a_launcher_that_exits_is_a_dead_group_and_nothing_of_it_is_left(tmp_path: Path) -> None:
    group, procs = fake_group(tmp_path, "exit")
    reason = wait_until(group.dead, "the group's death", timeout_s=10)
    assert "mlx.launch exited" in reason
    wait_until(lambda: gone(procs), "the ranks the launcher left behind to be killed", timeout_s=10)


def test_a_rank_that_dies_is_a_dead_group_at_once(tmp_path: Path) -> None:
    group, procs = fake_group(tmp_path, "wait")
    group.watch()  # after the handshake: the ranks are the launcher's children then
    try:
        assert group.dead() is None
        procs[1].kill()  # the launcher itself lives on (mlx.launch waits for the others)
        reason = wait_until(group.dead, "the group's death", timeout_s=10)
        assert reason == f"rank 0 (process {procs[1].pid}) of the engine group exited"
        wait_until(lambda: gone(procs), "every process of the group to be gone", timeout_s=10)
    finally:
        group.kill()


def test_rank_zero_silence_is_measured_from_its_last_answer(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path / 'engine.sock'}"
    ctx = zmq.Context()
    rank_zero = bind_router(ctx, address)
    now = [100.0]
    watch = RankZeroWatch(address, clock=lambda: now[0])
    try:
        assert watch.silent_s() == 0.0  # asks at once
        identity, query = rank_zero.recv_multipart()
        assert isinstance(codec.decode_frontend_message(query), StatusQuery)
        counts = {f.name: 0 for f in msgspec.structs.fields(EngineStatus) if f.required and f.name != "query_id"}
        status = EngineStatus(**{**counts, "query_id": "q"})
        rank_zero.send_multipart([identity, codec.encode(status)])
        now[0] += 5.0
        wait_until(lambda: watch.silent_s() == 0.0, "the answer to count")  # answered at t=105
        now[0] += engine_group.GROUP_SILENCE_LIMIT_S + 1
        assert watch.silent_s() == engine_group.GROUP_SILENCE_LIMIT_S + 1  # asked again, no answer
        assert rank_zero.poll(5000)  # every STATUS_PROBE_INTERVAL_S a new query
    finally:
        watch.close()
        rank_zero.close()
        ctx.term()


def test_the_launcher_waits_on_its_ranks_output_only() -> None:
    """mlx.launch's per-rank threads select on the rank's stdin pipe, which is always
    writable: unpatched they spin a core. group_launch gives them no write set."""
    from mlx._distributed_utils import launch

    from deploy import group_launch

    read_end, write_end = os.pipe()
    try:
        group_launch._calm_launcher()
        assert launch.select is group_launch._select_without_writes  # type: ignore[attr-defined]
        readable, writable, _ = launch.select([read_end], [write_end], [], 0.05)  # type: ignore[attr-defined]
        assert (readable, writable) == ([], [])
        os.write(write_end, b"x")
        assert launch.select([read_end], [write_end], [], 0.05)[0] == [read_end]  # type: ignore[attr-defined]
    finally:
        os.close(read_end)
        os.close(write_end)
