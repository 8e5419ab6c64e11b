"""A sharded engine under mlx-server: its startup errors, and groups of 2 ranks on this machine
(ring backend over 127.0.0.1). A tensor group serves like one process, heals a killed and a
hung follower and leaves nothing behind on SIGTERM; a pipeline group from a hostfile serves
alike and dies with a SIGKILLed mlx-server. Group starts are few: each loads the model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import psutil

from ipc import runtime
from tests.integration.server import REPO_ROOT, ServerProcess, child_env, free_port, long_stream, mlx_server_command
from tests.integration.test_startup_errors import assert_one_line_error
from tests.openai_schema import validate
from tests.waiting import wait_until

FAST_EXIT_S = 60  # the engine's pre-check imports mlx: seconds on a loaded 2-core box
# A killed follower: the supervisor sees its rank process gone and kills the group at once, so
# the stream's error comes within about a second; bounded generously for a loaded CI box.
GROUP_DEATH_DEADLINE_S = 8.0
# A stopped follower: rank 0 gives up on it after its group bound (engine.group: 10 s at a
# plan or poll broadcast, GROUP_STEP_TIMEOUT_S = 60 s inside one of the first steps' collectives).
HUNG_GROUP_DEADLINE_S = 90.0
RESTART_WAIT_S = 90.0
CHAT = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 24, "temperature": 0}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        mlx_server_command(*args), cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=FAST_EXIT_S
    )


def processes_naming(text: str) -> list[psutil.Process]:
    """Processes with `text` (a model path) in their command line or their runtime config (the
    ranks' command line is only `python -m engine`)."""
    found = []
    for p in psutil.process_iter():
        try:
            if text in " ".join(p.cmdline()) or text in p.environ().get(runtime.CONFIG_ENV, ""):
                found.append(p)
        except psutil.Error:
            pass
    return found


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, *needles)


# ---------------------------------------------------------------- startup errors


def test_bad_hostfile(tiny_model_dir: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},')
    assert_usage_error(run_cli(str(tiny_model_dir), "--distributed-hostfile", str(hostfile)), "not valid JSON")


def test_one_rank_is_not_a_group(tiny_model_dir: Path) -> None:
    assert_usage_error(run_cli(str(tiny_model_dir), "--distributed-ranks", "1"), "at least 2 ranks")


def test_hostfile_and_ranks_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    result = run_cli(str(tiny_model_dir), "--distributed-hostfile", str(hostfile), "--distributed-ranks", "2")
    assert_usage_error(result, "not both")


def test_heads_that_two_ranks_do_not_divide(tmp_path: Path) -> None:
    model = tmp_path / "odd-heads"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 3}))
    (model / "model.safetensors").write_bytes(b"")
    assert_usage_error(run_cli(str(model), "--distributed-ranks", "2"), "attention heads divisible by 2")


def test_engine_pre_check_refuses_a_model_that_cannot_split_that_way(tiny_model_dir: Path) -> None:
    # mlx-lm's llama has model.shard() (tensor) but no pipeline: the engine's own check says so
    # before any rank starts, and nothing of a group is left running.
    result = run_cli(str(tiny_model_dir), "--distributed-ranks", "2", "--distributed-mode", "pipeline")
    assert_usage_error(result, "llama", "pipeline")
    assert "engine group" not in result.stderr  # no group was started
    assert not processes_naming(str(tiny_model_dir))


def test_nccl_without_nvidia_gpus_is_refused_before_any_rank_starts(tiny_model_dir: Path) -> None:
    result = run_cli(str(tiny_model_dir), "--distributed-ranks", "2", "--distributed-backend", "nccl")
    assert_usage_error(result, "nccl needs NVIDIA GPUs", "use ring")
    assert not processes_naming(str(tiny_model_dir))


def test_a_group_whose_ranks_cannot_load_exits_with_the_cause(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-weights"
    shutil.copytree(tiny_qwen2_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")  # config.json passes every pre-check
    done = subprocess.run(
        mlx_server_command(str(broken), "--port", str(free_port()), "--distributed-ranks", "2"),
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=FAST_EXIT_S * 2,
    )
    assert done.returncode == 1
    assert "mlx-server: error: the engine group exited while starting" in done.stderr
    assert "engine: failed to load model" in done.stderr  # a rank's own line, relayed by mlx.launch
    assert not processes_naming(str(broken))


# ---------------------------------------------------------------- one group of 2 ranks


def group_processes(server: ServerProcess) -> tuple[psutil.Process, list[psutil.Process]]:
    """mlx.launch and its ranks (python processes whose environment has MLX_RANK)."""
    tree = server.process_tree()
    launcher = next(p for p in tree if "mlx.launch" in " ".join(p.cmdline()))
    ranks = sorted((p for p in launcher.children() if "MLX_RANK" in p.environ()), key=lambda p: p.environ()["MLX_RANK"])
    return launcher, ranks


def alive(p: psutil.Process) -> bool:
    # An orphaned rank that was killed is a zombie until whoever adopted it reaps it.
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def greedy(base: str) -> str:
    response = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def fault_during_a_stream(server: ServerProcess, no_eos: dict[str, int], fault: str, deadline_s: float) -> None:
    """Hit the follower (kill or stop it) while a long stream runs: the stream must end with the
    engine-unavailable error within deadline_s, and every process of that group must go."""
    launcher, ranks = group_processes(server)
    assert [r.environ()["MLX_RANK"] for r in ranks] == ["0", "1"]
    result: dict = {}
    stream = threading.Thread(target=long_stream, args=(server.base_url, result, no_eos, 120))
    stream.start()
    wait_until(lambda: "first_at" in result, "the stream to start", context=server.log_text)
    getattr(ranks[1], fault)()
    stream.join(deadline_s)
    assert not stream.is_alive(), f"the stream outlived its group ({fault})"
    last = json.loads(result["events"][-1])
    assert last["error"]["type"] == "server_error"
    wait_until(lambda: not any(alive(p) for p in [launcher, *ranks]), "the old group to be gone", 30)


def back_after_restart(server: ServerProcess, restarts: int, expected: str) -> None:
    """503 with Retry-After while the group restarts, then the same answers as before."""
    base = server.base_url
    down = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30)
    if down.status_code == 503:  # the group may already be back: both are right
        assert down.headers["Retry-After"]
        validate(down.json(), "ErrorResponse")
    wait_until(lambda: ready(base), "the restarted group", RESTART_WAIT_S, context=server.log_text)
    assert greedy(base) == expected
    status = wait_until(lambda: status_answer(base), "a worker's status after the restart")
    assert status.json()["engine"]["restarts"] == restarts
    assert status.json()["group"]["size"] == 2


def status_answer(base: str) -> httpx.Response | None:
    response = httpx.get(f"{base}/v1/mlx/status", timeout=5)
    return response if response.status_code == 200 else None


def test_two_ranks_serve_heal_a_lost_or_hung_follower_and_stop_whole(tiny_qwen2_dir: Path, server_logs: Path) -> None:
    with ServerProcess(tiny_qwen2_dir, server_logs, workers=1) as single:
        expected = greedy(single.base_url)

    server = ServerProcess(tiny_qwen2_dir, server_logs, "--distributed-ranks", "2", workers=1).wait_ready()
    try:
        base = server.base_url
        assert greedy(base) == expected

        status = status_answer(base)
        assert status is not None
        group = status.json()["group"]
        assert (group["mode"], group["backend"], group["size"]) == ("tensor", "ring", 2)
        assert [r["rank"] for r in group["ranks"]] == [0, 1]
        assert all(r["memory"]["active_bytes"] > 0 and r["host"] for r in group["ranks"])
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert 'mlx_server_engine_group_info{backend="ring",mode="tensor"} 1.0' in metrics
        assert 'mlx_server_engine_rank_memory_active_bytes{host="' in metrics

        eos = json.loads((tiny_qwen2_dir / "config.json").read_text())["eos_token_id"]
        no_eos = {str(t): -100 for t in eos}
        fault_during_a_stream(server, no_eos, "kill", GROUP_DEATH_DEADLINE_S)
        back_after_restart(server, 1, expected)
        # Who is seen first (the lost rank, or mlx.launch that stopped the other and left) is a race.
        assert "of the engine group exited; restart 1 of 5" in server.log_text() or (
            "mlx.launch exited (a rank of the engine group stopped); restart 1 of 5" in server.log_text()
        )

        # A follower that hangs (SIGSTOP) never returns from a collective by itself: rank 0's
        # bound ends it, and the group goes whole (SIGKILL reaches a stopped process too).
        fault_during_a_stream(server, no_eos, "suspend", HUNG_GROUP_DEADLINE_S)
        back_after_restart(server, 2, expected)

        launcher, ranks = group_processes(server)
        second_group = [launcher, *ranks]
        server._tree = server.process_tree()  # stop() checks the tree it saw: the restarted one
        assert server.stop(signal.SIGTERM) == 0  # and that no process of it is left
        assert not any(alive(p) for p in second_group)
    finally:
        if server.proc.poll() is None:
            server.kill()


def test_pipeline_group_from_a_hostfile_answers_alike_and_dies_with_a_killed_supervisor(
    tiny_qwen2_dir: Path, server_logs: Path, tmp_path: Path
) -> None:
    with ServerProcess(tiny_qwen2_dir, server_logs, workers=1) as single:
        expected = greedy(single.base_url)
    hostfile = tmp_path / "hosts.json"  # both hosts are this machine: mlx.launch runs them without ssh
    hostfile.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2}))
    server = ServerProcess(
        tiny_qwen2_dir,
        server_logs,
        *("--distributed-hostfile", str(hostfile), "--distributed-mode", "pipeline"),
        workers=1,
    ).wait_ready()
    everything = server.process_tree()
    try:
        assert greedy(server.base_url) == expected
        status = status_answer(server.base_url)
        assert status is not None
        assert (status.json()["group"]["mode"], status.json()["group"]["size"]) == ("pipeline", 2)
        launcher, ranks = group_processes(server)
        assert {launcher, *ranks} <= set(everything)
        server.proc.kill()  # no drain, no stop: the group must notice on its own
        server.proc.wait(30)
        _, alive = psutil.wait_procs(everything, timeout=30)
        assert not alive, f"left behind by a killed mlx-server: {alive}"
    finally:
        for p in reversed(everything):  # a failed check must not leave its processes behind
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        server.kill()
