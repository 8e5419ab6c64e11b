"""mlx-server with a quantized KV cache (--kv-bits): it serves, and a model it cannot serve
that way stops the start with one line."""

from __future__ import annotations

import httpx

from tests.integration.server import ChildProcess, ServerProcess, free_port, mlx_server_command

EXIT_TIMEOUT_S = 120


def test_kv_bits_8_serves_a_chat_completion_and_the_status(slow_model_dir, server_logs):
    # The "bench" size: head size 64, which kv_group_size 64 divides.
    with ServerProcess(slow_model_dir, server_logs, "--kv-bits", "8", workers=1) as server:
        payload = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0}
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json=payload, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] >= 1
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        status = httpx.get(f"{server.base_url}/v1/mlx/status", timeout=10)
        assert status.status_code == 200 and status.json()["engine"]["running_requests"] == 0
        assert (status.json()["kv_cache"]["bits"], status.json()["kv_cache"]["group_size"]) == (8, 64)


def test_a_head_size_the_group_size_does_not_divide_stops_the_start(tiny_model_dir, server_logs):
    # The tiny model's heads have 16 elements: no kv_group_size divides them.
    port = str(free_port())
    child = ChildProcess(
        mlx_server_command(str(tiny_model_dir), "--port", port, "--kv-bits", "4"),
        server_logs / f"kv-bits-refused-{port}.log",
    )
    code = child.proc.wait(EXIT_TIMEOUT_S)
    assert child.stop() == code != 0
    assert "engine: error: kv_group_size 64 does not divide this model's head size 16" in child.log_text()
