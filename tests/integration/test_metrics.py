"""/metrics on a real mlx-server with 2 gunicorn workers; JSON logs with request ids."""

from __future__ import annotations

import json
import os

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.server import ServerProcess
from tests.sse import sse_chunks

CHAT = "/v1/chat/completions"
SECRET = "zebra-violet-secret-prompt"
MAX_STATUS_CALLS = 200  # bounded: until both workers have answered


def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    result = httpx.get(f"{base}/metrics", timeout=10)
    assert result.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(result.text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def server(tiny_model_dir, server_logs):
    with ServerProcess(tiny_model_dir, server_logs, "--log-format", "json", "--log-level", "debug", workers=2) as s:
        yield s


def gunicorn_master(server: ServerProcess) -> psutil.Process:
    return next(p for p in psutil.Process(server.proc.pid).children() if "gunicorn" in " ".join(p.cmdline()))


def test_counters_add_up_across_workers(server):
    base = server.base_url
    usage = {"prompt": 0, "completion": 0}
    requests = 6
    for i in range(requests):
        body = {"messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 6 + i}
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{base}{CHAT}", json=body, timeout=30) as r:
                assert r.status_code == 200
                events = list(sse_chunks(r.iter_text()))
            u = events[-1]["usage"]
        else:
            r = httpx.post(f"{base}{CHAT}", json=body, timeout=30)
            assert r.status_code == 200, r.text
            u = r.json()["usage"]
        usage["prompt"] += u["prompt_tokens"]
        usage["completion"] += u["completion_tokens"]

    # Status answers name the worker; go on until both have answered some.
    pids, calls = set(), 0
    while len(pids) < 2 and calls < MAX_STATUS_CALLS:
        # httpx.get opens a new connection each time, so the workers take turns.
        pids.add(httpx.get(f"{base}/v1/mlx/status", timeout=10).json()["frontend"]["pid"])
        calls += 1
    assert len(pids) == 2, "one worker answered every request"

    # Whichever worker answers a scrape, it reports every worker's counts.
    for _ in range(6):
        samples = scrape(base)
        requests_total = "mlx_server_http_requests_total"
        assert value(samples, requests_total, route="/v1/mlx/status", method="GET", status="200") == calls
        assert value(samples, requests_total, route=CHAT, method="POST", status="200") == requests
        assert value(samples, "mlx_server_http_request_duration_seconds_count", route=CHAT, method="POST") == requests
        assert value(samples, "mlx_server_time_to_first_token_seconds_count") == requests
        assert value(samples, "mlx_server_prompt_tokens_total") == usage["prompt"]
        assert value(samples, "mlx_server_generation_tokens_total") == usage["completion"]
        assert value(samples, "mlx_server_inter_token_latency_seconds_count") == usage["completion"] - requests
        assert value(samples, "mlx_server_engine_up") == 1
        assert value(samples, "mlx_server_engine_requests_finished_total") >= requests
        assert value(samples, "mlx_server_engine_generation_tokens_total") >= usage["completion"]
        assert value(samples, "mlx_server_engine_running_requests") == 0
        assert value(samples, "mlx_server_engine_queued_requests") == 0


def test_multiprocess_dir_is_private_and_removed(tiny_model_dir, server_logs):
    s = ServerProcess(tiny_model_dir, server_logs, workers=2).wait_ready()
    try:
        assert httpx.get(f"{s.base_url}/v1/models", timeout=10).status_code == 200
        # The workers keep their metric files open (the variable was set after exec: not in /proc/PID/environ).
        files = {f.path for w in gunicorn_master(s).children() for f in w.open_files() if f.path.endswith(".db")}
        [path] = {os.path.dirname(f) for f in files}
        assert os.path.basename(path).startswith("mlx-server-metrics-")
        assert os.stat(path).st_mode & 0o777 == 0o700
    finally:
        assert s.stop() == 0
    assert not os.path.exists(path)


def test_json_logs_carry_request_ids_and_no_prompts(server):
    base = server.base_url
    messages = [{"role": "user", "content": SECRET}]
    r = httpx.post(f"{base}{CHAT}", json={"messages": messages, "max_tokens": 4}, timeout=30)
    assert r.status_code == 200
    response_id = r.json()["id"]
    assert r.headers["X-Request-Id"] == response_id
    bad = httpx.post(f"{base}{CHAT}", json={"messages": messages, "n": 10_000}, timeout=30)
    assert bad.status_code == 400

    entries = []
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    roles = {e["role"] for e in entries}
    assert {"mlx-server", "engine", "web"} <= roles
    mine = [e for e in entries if e.get("request_id") == response_id]
    assert mine, "no log line carries the response id"
    assert all(e["role"] == "web" for e in mine)
    assert SECRET not in server.log_text()
