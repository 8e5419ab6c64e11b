"""Never hang, never lose a request: engine death, restarts, drain, health, API keys."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.integration.server import ServerProcess, long_stream
from tests.openai_schema import validate
from tests.sse import sse_data
from tests.waiting import wait_until

# In-flight requests must end this soon after the engine dies.
ENGINE_DEATH_DEADLINE_S = 2.0


def engine_process(server: ServerProcess) -> psutil.Process:
    for p in server.process_tree():
        if "engine" in p.cmdline() and "-m" in p.cmdline():
            return p
    raise AssertionError("no engine process")


def gunicorn_master(server: ServerProcess) -> psutil.Process:
    return next(p for p in psutil.Process(server.proc.pid).children() if "gunicorn" in " ".join(p.cmdline()))


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_engine_kill_fails_in_flight_then_service_returns(tiny_model_dir, server_logs, no_eos):
    with ServerProcess(tiny_model_dir, server_logs) as server:
        base = server.base_url
        web_pid = gunicorn_master(server).pid
        result: dict = {}
        t = threading.Thread(target=long_stream, args=(base, result, no_eos))
        t.start()
        wait_until(lambda: "first_at" in result, "the stream to start")
        engine_process(server).kill()
        killed_at = time.monotonic()
        t.join(30)
        assert not t.is_alive()
        assert result["ended_at"] - killed_at < ENGINE_DEATH_DEADLINE_S
        last = json.loads(result["events"][-1])
        assert "error" in last and last["error"]["type"] == "server_error"

        down = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        if down.status_code == 503:  # the engine may already be back: both are right
            assert down.headers["Retry-After"]
            validate(down.json(), "ErrorResponse")
        wait_until(lambda: ready(base), "the restarted engine")
        again = httpx.post(
            f"{base}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3},
            timeout=30,
        )
        assert again.status_code == 200
        assert gunicorn_master(server).pid == web_pid  # gunicorn was not restarted
        assert "restart 1 of 5" in server.log_text()
        # Each worker reconnects on its own: the one answering next may still be on its
        # way back (a 503 with Retry-After), so wait for an answer from one that is back.
        answers: list[httpx.Response] = []
        wait_until(lambda: answers.append(httpx.get(f"{base}/v1/mlx/status", timeout=5)) or
                   answers[-1].status_code == 200, "a worker's status after the restart")  # fmt: skip
        assert answers[-1].json()["engine"]["restarts"] == 1
        wait_until(lambda: "mlx_server_engine_restarts_total 1.0" in httpx.get(f"{base}/metrics", timeout=5).text,
                   "the restart in /metrics")  # fmt: skip


def test_crash_loop_gives_up_with_the_cause(tiny_model_dir, server_logs):
    server = ServerProcess(tiny_model_dir, server_logs, "--max-engine-restarts", "1").wait_ready()
    engine_process(server).kill()
    wait_until(lambda: ready(server.base_url), "the first restart")
    engine_process(server).kill()
    code = server.proc.wait(30)
    server.stop()
    assert code == 1
    assert "gave up after 1 restarts" in server.log_text()


def test_graceful_stop_finishes_running_requests_and_refuses_new_ones(tiny_model_dir, server_logs, no_eos):
    server = ServerProcess(tiny_model_dir, server_logs).wait_ready()
    base = server.base_url
    result: dict = {}

    def finite_stream() -> None:
        payload = {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 400,
            "stream": True,
            "logit_bias": no_eos,
        }
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=60) as r:
            result["events"] = list(sse_data(r.iter_text()))

    t = threading.Thread(target=finite_stream)
    t.start()
    wait_until(lambda: httpx.get(f"{base}/v1/mlx/status").json()["engine"]["tokens_generated"] > 0, "tokens")
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not ready(base), "drain to start")
    refused = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    t.join(60)
    assert server.stop() == 0
    assert result["events"][-1] == "[DONE]"
    assert json.loads(result["events"][-2])["choices"][0]["finish_reason"] == "length"


def test_health_and_api_keys(tiny_model_dir, server_logs, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("file-key\n")
    with ServerProcess(tiny_model_dir, server_logs, "--api-key", "flag-key", "--api-key-file", str(key_file)) as server:
        base = server.base_url
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/health/ready").status_code == 200
        r = httpx.get(f"{base}/v1/models")
        assert r.status_code == 401
        validate(r.json(), "ErrorResponse")
        for key in ("flag-key", "file-key"):
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            assert [m.id for m in client.models.list()] == [tiny_model_dir.name]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_killed_worker_is_respawned_and_its_requests_aborted(slow_model_dir, server_logs, no_eos):
    with ServerProcess(slow_model_dir, server_logs, workers=1) as server:
        base = server.base_url
        result: dict = {}

        def doomed() -> None:
            try:
                long_stream(base, result, no_eos)
            except httpx.HTTPError:
                result["cut"] = True

        t = threading.Thread(target=doomed)
        t.start()
        wait_until(lambda: "first_at" in result, "the stream to start")
        (worker,) = gunicorn_master(server).children()
        worker.kill()
        t.join(30)
        wait_until(lambda: ready(base), "a respawned worker")

        def idle() -> bool:
            engine = httpx.get(f"{base}/v1/mlx/status", timeout=5).json()["engine"]
            return engine["running_requests"] + engine["queued_requests"] == 0

        wait_until(idle, "the engine to abort the dead worker's request")
        assert "went silent: aborted its requests" in server.log_text()


@pytest.fixture(scope="module")
def tight_server(slow_model_dir, server_logs):
    """One decode slot and one queue place: backpressure shows at the third request."""
    args = ("--max-batch-size", "1", "--prefill-batch-size", "1", "--max-queued-requests", "1")
    with ServerProcess(slow_model_dir, server_logs, *args, workers=1) as server:
        yield server


def engine_idle(base: str) -> bool:
    engine = httpx.get(f"{base}/v1/mlx/status", timeout=5).json()["engine"]
    return engine["running_requests"] + engine["queued_requests"] == 0


def test_non_streaming_client_that_gives_up_is_aborted(tight_server, no_eos):
    base = tight_server.base_url
    wait_until(lambda: engine_idle(base), "an idle engine")
    payload = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3000, "logit_bias": no_eos}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=2)
    wait_until(lambda: engine_idle(base), "the abandoned request to be aborted")
    assert "client went away" in tight_server.log_text()


def test_full_queue_answers_429_with_retry_after(tight_server, no_eos):
    base = tight_server.base_url
    wait_until(lambda: engine_idle(base), "an idle engine")
    payload = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 40, "logit_bias": no_eos}
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=120))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # in order: the first runs, the second waits, the rest find the queue full
    for t in threads:
        t.join(120)
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 429 in codes, codes
    for r in results:
        if r.status_code == 429:
            assert r.headers["Retry-After"]
            validate(r.json(), "ErrorResponse")


def test_supervisor_death_takes_engine_and_gunicorn_with_it(tiny_model_dir, server_logs):
    """mlx-server SIGKILLed (no cleanup possible): its children must not hold the model."""
    server = ServerProcess(tiny_model_dir, server_logs).wait_ready()
    children = server.process_tree()[1:]
    assert children
    server.proc.kill()
    server.proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    server.stop()
    assert not alive, f"left running after the supervisor died: {alive}"


def test_worker_connections_bound_what_one_worker_serves(slow_model_dir, server_logs, no_eos):
    """--worker-connections 2: a third connection waits (not refused, not lost) until one closes."""
    with ServerProcess(slow_model_dir, server_logs, "--worker-connections", "2", workers=1) as server:
        base = server.base_url
        payload = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3000, "stream": True,
                   "logit_bias": no_eos}  # fmt: skip
        with httpx.Client(timeout=30) as one, httpx.Client(timeout=30) as two:
            with one.stream("POST", f"{base}/v1/chat/completions", json=payload) as first:
                with two.stream("POST", f"{base}/v1/chat/completions", json=payload) as second:
                    # Keep the line iterators: dropping one closes its connection.
                    lines = [first.iter_lines(), second.iter_lines()]
                    assert all(next(it).startswith("data: ") for it in lines)
                    # Both of the worker's connections are busy: the third is queued unanswered.
                    with pytest.raises(httpx.ReadTimeout):
                        httpx.get(f"{base}/v1/models", timeout=httpx.Timeout(30, read=2))
                # The second stream closed: its place serves the next connection.
                assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 200
        wait_until(lambda: engine_idle(base), "both closed streams to be aborted")
