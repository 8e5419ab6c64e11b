"""Admission by KV budget over HTTP: a flood of long prompts against a small budget queues
and completes (or gets 429), a request no budget can hold is a 400, the engine never restarts."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.integration.server import ServerProcess
from tests.openai_schema import validate
from tests.waiting import wait_until

# The tiny model's KV: 2 layers x 2 KV heads x (key + value) x head size 16 x 4 bytes.
BYTES_PER_TOKEN = 512
# Two rows of about 700 tokens (whole steps of 256: 768 each) fit, a third does not.
BUDGET = 2 * 768 * BYTES_PER_TOKEN + 1000
MAX_QUEUED = 4
FLOOD = 12
MAX_TOKENS = 60
REQUEST_TIMEOUT_S = 300


def long_prompt(i: int, words: int = 200) -> str:
    return f"request {i}: " + " ".join(f"w{(i * 31 + j) % 97}" for j in range(words))


@pytest.fixture(scope="module")
def server(tiny_model_dir, server_logs):
    args = ("--kv-cache-budget-bytes", str(BUDGET), "--max-queued-requests", str(MAX_QUEUED))
    with ServerProcess(tiny_model_dir, server_logs, *args) as s:
        yield s


def status(base: str) -> dict:
    return httpx.get(f"{base}/v1/mlx/status", timeout=10).json()


def post(base: str, prompt: str, no_eos: dict, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    payload = {"prompt": prompt, "max_tokens": max_tokens, "logit_bias": no_eos}
    return httpx.post(f"{base}/v1/completions", json=payload, timeout=REQUEST_TIMEOUT_S)


def test_status_shows_the_budget(server):
    kv = status(server.base_url)["kv_cache"]
    assert kv["budget_bytes"] == BUDGET and kv["bytes_per_token"] == BYTES_PER_TOKEN
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    assert f"mlx_server_engine_kv_budget_bytes {float(BUDGET)}" in metrics


def test_a_flood_of_long_prompts_queues_and_completes_or_gets_429(server, no_eos):
    base = server.base_url
    one = post(base, long_prompt(0), no_eos)
    assert one.status_code == 200, one.text
    prompt_tokens = one.json()["usage"]["prompt_tokens"]
    assert 512 < prompt_tokens + MAX_TOKENS <= 768  # so two rows fit the budget and three do not
    results: list[httpx.Response] = []

    def one_request(i: int) -> None:
        results.append(post(base, long_prompt(i), no_eos))

    threads = [threading.Thread(target=one_request, args=(i,)) for i in range(1, FLOOD + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    codes = [r.status_code for r in results]
    assert len(codes) == FLOOD and set(codes) <= {200, 429}, codes
    # The queue's bound counts the rows still prefilling (engine "queued"): a flood that
    # arrives while the first two prefill may get no more than MAX_QUEUED answers.
    assert codes.count(200) >= MAX_QUEUED, codes
    for r in results:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
        else:
            validate(r.json(), "ErrorResponse")
            assert r.headers["Retry-After"]
    wait_until(lambda: status(base)["engine"]["running_requests"] == 0, "the engine to go idle")
    after = status(base)
    assert after["engine"]["restarts"] == 0
    assert after["kv_cache"]["reserved_bytes"] == 0
    assert after["kv_cache"]["prefix_cache_bytes"] <= BUDGET


def test_a_request_no_budget_can_hold_is_a_400_naming_the_numbers(server, no_eos):
    def not_turned_away_as_busy() -> httpx.Response | None:
        # A worker's view of the engine's queue is up to one heartbeat old: right after
        # the flood it may still answer 429 before the engine sees the request at all.
        r = post(server.base_url, long_prompt(99, words=900), no_eos)
        return None if r.status_code == 429 else r

    r = wait_until(not_turned_away_as_busy, "the workers to see the queue empty")
    assert r.status_code == 400, r.text
    validate(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert "KV budget" in error["message"] and f"{BYTES_PER_TOKEN} bytes per token" in error["message"]
    assert status(server.base_url)["engine"]["restarts"] == 0
