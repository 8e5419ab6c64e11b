"""GET /metrics, request ids and the generation hook, against the fake engine.

The metrics live in this process's default registry (single-process mode), so
every test compares a scrape before and after what it does.
"""

from __future__ import annotations

import logging
import time

import falcon.testing
import pytest
from prometheus_client.parser import text_string_to_metric_families

from frontend import metrics
from frontend.middleware import REQUEST_ID_HEADER
from frontend.tokenization import Tokenization
from ipc.messages import Generate, GroupStatus, RankStatus, TokenDelta
from tests.unit.fakes import Script

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello world!"}]

Samples = dict[tuple[str, frozenset], float]


def scrape(client: falcon.testing.TestClient) -> Samples:
    result = client.simulate_get("/metrics")
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(result.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def chat(client: falcon.testing.TestClient, **body: object) -> falcon.testing.Result:
    return client.simulate_post(CHAT, json={"messages": MESSAGES, **body})


def ids(tok: Tokenization, text: str) -> list[int]:
    return tok.hf.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("stream", [False, True])
def test_chat_counts_tokens_ttft_and_inter_token_latency(client, engine, tok, stream):
    answer = ids(tok, "Paris is the capital of France.")
    engine.script(Script(answer))
    before = scrape(client)
    result = chat(client, max_tokens=50, stream=stream)
    assert result.status_code == 200, result.text
    after = scrape(client)

    [request] = engine.submitted
    assert delta(before, after, "mlx_server_prompt_tokens_total") == len(request.prompt_token_ids)
    assert delta(before, after, "mlx_server_generation_tokens_total") == len(answer)
    assert delta(before, after, "mlx_server_time_to_first_token_seconds_count") == 1
    # One delta per token: every token after the first has a gap.
    assert delta(before, after, "mlx_server_inter_token_latency_seconds_count") == len(answer) - 1
    labels = {"route": CHAT, "method": "POST"}
    assert delta(before, after, "mlx_server_http_requests_total", status="200", **labels) == 1
    assert delta(before, after, "mlx_server_http_request_duration_seconds_count", **labels) == 1


def test_each_choice_is_observed(client, engine, tok):
    engine.default = Script(ids(tok, "Hello there"))
    before = scrape(client)
    assert chat(client, n=3, max_tokens=20).status_code == 200
    after = scrape(client)
    assert delta(before, after, "mlx_server_time_to_first_token_seconds_count") == 3
    assert delta(before, after, "mlx_server_generation_tokens_total") == 3 * len(ids(tok, "Hello there"))


def test_tokens_of_a_stream_cut_short_still_count(client, engine, tok):
    # A stop string ends the choice early: the stream is closed (aborted) mid-way.
    engine.script(Script(ids(tok, "STOP here. END of the story.")))
    before = scrape(client)
    result = chat(client, stop=["END"], max_tokens=50)
    assert result.status_code == 200, result.text
    after = scrape(client)
    assert result.json["choices"][0]["message"]["content"] == "STOP here. "
    assert delta(before, after, "mlx_server_generation_tokens_total") > 0
    assert engine.all_closed()


def test_engine_unavailable_is_a_counted_503(client, engine):
    engine.available = False
    before = scrape(client)
    assert chat(client, max_tokens=5).status_code == 503
    after = scrape(client)
    assert delta(before, after, "mlx_server_http_requests_total", route=CHAT, method="POST", status="503") == 1
    assert delta(before, after, "mlx_server_time_to_first_token_seconds_count") == 0


class _ScriptedStream:
    """A RequestStream whose deltas arrive after set waits (seconds after the previous one)."""

    def __init__(self, deltas: list[tuple[float, TokenDelta]]) -> None:
        self.request_id = "r1"
        self._deltas = deltas
        self.closed = False

    def __iter__(self):
        for wait, delta_ in self._deltas:
            time.sleep(wait)
            yield delta_

    def close(self) -> None:
        self.closed = True


def _histogram(name: str) -> tuple[float, float]:
    registry = metrics.DEFAULT_REGISTRY
    return registry.get_sample_value(f"{name}_count") or 0.0, registry.get_sample_value(f"{name}_sum") or 0.0


def test_observed_stream_measures_gaps_and_spreads_multi_token_deltas():
    ttft0, itl0 = (
        _histogram("mlx_server_time_to_first_token_seconds"),
        _histogram("mlx_server_inter_token_latency_seconds"),
    )
    inner = _ScriptedStream(
        [
            (0.05, TokenDelta("r1", [1])),
            (0.05, TokenDelta("r1", [2, 3])),  # two tokens in one delta: two gaps of half the wait
            (0.0, TokenDelta("r1", [], "stop")),  # the final delta without tokens: no gap
        ]
    )
    request = Generate(request_id="r1", prompt_token_ids=[5, 6, 7], max_tokens=10)
    with metrics.observe_stream(inner, request) as stream:
        assert [d.token_ids for d in stream] == [[1], [2, 3], []]
    assert inner.closed
    ttft, itl = (
        _histogram("mlx_server_time_to_first_token_seconds"),
        _histogram("mlx_server_inter_token_latency_seconds"),
    )
    assert ttft[0] - ttft0[0] == 1
    assert ttft[1] - ttft0[1] >= 0.049
    assert itl[0] - itl0[0] == 2
    assert 0.049 <= itl[1] - itl0[1] < 5.0  # sleeps only overshoot


def test_error_deltas_are_not_tokens():
    before = _histogram("mlx_server_time_to_first_token_seconds")
    inner = _ScriptedStream([(0.0, TokenDelta("r1", [], "error", 0, "boom"))])
    stream = metrics.observe_stream(inner, Generate(request_id="r1", prompt_token_ids=[1], max_tokens=1))
    list(stream)
    stream.close()
    assert _histogram("mlx_server_time_to_first_token_seconds") == before


# ---------------------------------------------------------------- HTTP


def test_routes_and_statuses(client):
    before = scrape(client)
    assert client.simulate_get("/v1/models").status_code == 200
    assert client.simulate_get("/no/such/path").status_code == 404
    assert client.simulate_get("/v1/models/some-model").status_code == 410
    assert client.simulate_post(CHAT, body=b"{").status_code == 400
    after = scrape(client)
    counted = {
        ("/v1/models", "GET", "200"),
        ("unmatched", "GET", "404"),
        ("/v1/models/{model_id:path}", "GET", "410"),
        (CHAT, "POST", "400"),
    }
    for route, method, status in counted:
        assert delta(before, after, "mlx_server_http_requests_total", route=route, method=method, status=status) == 1


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")
def test_unknown_methods_share_one_label(client):
    before = scrape(client)
    client.simulate_request("BREW", "/v1/models")
    after = scrape(client)
    assert delta(before, after, "mlx_server_http_requests_total", route="/v1/models", method="other", status="400") == 1


def test_request_id_header(client, engine, tok):
    engine.script(Script(ids(tok, "Hello")))
    result = chat(client, max_tokens=5)
    assert result.headers[REQUEST_ID_HEADER] == result.json["id"]
    assert client.simulate_get("/v1/models").headers[REQUEST_ID_HEADER].startswith("req-")


# ---------------------------------------------------------------- engine gauges


def test_engine_status_at_scrape_time(client, engine):
    before = engine.status_queries
    samples = scrape(client)
    assert engine.status_queries == before + 1
    assert value(samples, "mlx_server_engine_up") == 1
    assert value(samples, "mlx_server_engine_running_requests") == 2
    assert value(samples, "mlx_server_engine_queued_requests") == 1
    assert value(samples, "mlx_server_engine_prompt_cache_hits_total") == 7
    assert value(samples, "mlx_server_engine_prompt_cache_hit_tokens_total") == 99
    assert value(samples, "mlx_server_engine_prompt_cache_bytes") == 4096
    assert value(samples, "mlx_server_engine_prompt_cache_entries") == 3
    assert value(samples, "mlx_server_engine_generation_tokens_total") == 1234
    assert value(samples, "mlx_server_engine_uptime_seconds") == 12.5
    assert value(samples, "mlx_server_engine_steps_total") == 300
    assert value(samples, "mlx_server_engine_step_seconds_total") == 1.5
    assert value(samples, "mlx_server_engine_start_time_seconds") == engine.model.created


def test_one_engine_process_has_no_group_metrics(client, engine):
    samples = scrape(client)
    assert not any(name.startswith(("mlx_server_engine_group", "mlx_server_engine_rank")) for name, _ in samples)


def test_a_sharded_engine_shows_its_split_and_every_rank_memory(client, engine):
    engine.group = GroupStatus(
        mode="tensor",
        backend="jaccl",
        ranks=[
            RankStatus(rank=0, host="mac-a", active_memory_bytes=100, peak_memory_bytes=150),
            RankStatus(rank=1, host="mac-b", active_memory_bytes=200, peak_memory_bytes=250),
        ],
    )
    samples = scrape(client)
    assert value(samples, "mlx_server_engine_group_info", mode="tensor", backend="jaccl") == 1
    assert value(samples, "mlx_server_engine_group_ranks") == 2
    assert value(samples, "mlx_server_engine_rank_memory_active_bytes", rank="0", host="mac-a") == 100
    assert value(samples, "mlx_server_engine_rank_memory_active_bytes", rank="1", host="mac-b") == 200
    assert value(samples, "mlx_server_engine_rank_memory_peak_bytes", rank="0", host="mac-a") == 150
    assert value(samples, "mlx_server_engine_rank_memory_peak_bytes", rank="1", host="mac-b") == 250


def test_scrape_works_while_the_engine_is_down(client, engine):
    engine.available = False
    samples = scrape(client)
    assert value(samples, "mlx_server_engine_up") == 0
    assert not any(name.startswith("mlx_server_engine_") and name != "mlx_server_engine_up" for name, _ in samples)


def test_metric_names_are_documented():
    readme = (metrics.__file__.rsplit("/frontend/", 1)[0]) + "/README.md"
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    for name in (
        "mlx_server_http_requests_total",
        "mlx_server_time_to_first_token_seconds",
        "mlx_server_inter_token_latency_seconds",
        "mlx_server_engine_queued_requests",
        "mlx_server_engine_running_requests",
        "mlx_server_engine_prompt_cache_hits_total",
        "mlx_server_engine_steps_total",
        "mlx_server_engine_step_seconds_total",
        "mlx_server_engine_group_info",
        "mlx_server_engine_group_ranks",
        "mlx_server_engine_rank_memory_active_bytes",
        "mlx_server_engine_rank_memory_peak_bytes",
    ):
        assert name in text, name


# ---------------------------------------------------------------- logs


def test_prompts_are_not_logged_at_info(client, engine, tok, caplog):
    secret = "my-secret-prompt-text"
    engine.script(Script(ids(tok, "Hello")))
    with caplog.at_level(logging.DEBUG):
        result = client.simulate_post(CHAT, json={"messages": [{"role": "user", "content": secret}], "max_tokens": 5})
        assert result.status_code == 200
        engine.available = False  # a failing request logs too
        client.simulate_post(CHAT, json={"messages": [{"role": "user", "content": secret}]})
    assert caplog.records
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and secret in r.getMessage()]
