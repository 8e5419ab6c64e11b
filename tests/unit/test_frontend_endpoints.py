"""Models, status, removed endpoints and the error JSON of Falcon's own errors."""

from __future__ import annotations

import falcon.testing
import pytest

from frontend.app import create_app
from frontend.tokenization import Tokenization
from ipc.messages import GroupStatus, RankStatus
from tests.openai_schema import validate
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, make_model_info, write_tokenizer_dir


@pytest.fixture
def engine() -> FakeEngineClient:
    return FakeEngineClient(model_info=make_model_info(adapter_path="/adapters/a1"))


@pytest.fixture
def client(engine: FakeEngineClient, tok: Tokenization) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))


def test_models(client):
    result = client.simulate_get("/v1/models")
    assert result.status_code == 200
    validate(result.json, "ListModelsResponse")
    [card] = result.json["data"]
    assert card["id"] == "tiny-test-model"
    assert card["object"] == "model"
    assert card["owned_by"] == "mlx-server"
    assert card["created"] == 1_700_000_000
    assert card["context_length"] == 256
    assert card["adapter"] == "/adapters/a1"


def test_trailing_slash_is_the_same_route(client):
    assert client.simulate_get("/v1/models/").status_code == 200


def test_status(client, engine):
    result = client.simulate_get("/v1/mlx/status")
    assert result.status_code == 200
    body = result.json
    assert body["model"] == {
        "id": "tiny-test-model",
        "path": "/models/tiny-test-model",
        "adapter": "/adapters/a1",
        "context_length": 256,
        "vocab_size": 512,
        "created": 1_700_000_000,
    }
    assert body["engine"]["state"] == "ready"
    assert body["engine"]["running_requests"] == 2
    assert body["engine"]["queued_requests"] == 1
    assert body["engine"]["tokens_generated"] == 1234
    assert body["engine"]["steps"] == 300 and body["engine"]["step_seconds"] == 1.5
    assert body["prompt_cache"]["hits"] == 7
    assert body["memory"]["peak_bytes"] == 2 << 20
    assert body["kv_cache"] == {
        "budget_bytes": 1 << 30,
        "reserved_bytes": 3 << 20,
        "prefix_cache_bytes": 4096,
        "bytes_per_token": 2048,
        "bits": 8,
        "group_size": 64,
    }
    assert body["frontend"]["pid"] > 0
    assert body["group"] is None  # one engine process
    assert engine.status_queries == 1


def test_status_of_a_sharded_engine_lists_its_ranks(client, engine):
    engine.group = GroupStatus(
        mode="pipeline",
        backend="ring",
        ranks=[
            RankStatus(rank=0, host="mac-a", active_memory_bytes=3 << 20, peak_memory_bytes=4 << 20),
            RankStatus(rank=1, host="mac-b", active_memory_bytes=5 << 20, peak_memory_bytes=6 << 20),
        ],
    )
    result = client.simulate_get("/v1/mlx/status")
    assert result.status_code == 200
    assert result.json["group"] == {
        "mode": "pipeline",
        "backend": "ring",
        "size": 2,
        "ranks": [
            {"rank": 0, "host": "mac-a", "memory": {"active_bytes": 3 << 20, "peak_bytes": 4 << 20}},
            {"rank": 1, "host": "mac-b", "memory": {"active_bytes": 5 << 20, "peak_bytes": 6 << 20}},
        ],
    }


def test_status_engine_unavailable(client, engine):
    engine.available = False
    result = client.simulate_get("/v1/mlx/status")
    assert result.status_code == 503
    assert result.headers["retry-after"] == "5"
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["code"] == "engine_unavailable"


@pytest.mark.parametrize(
    "method, path, words",
    [
        ("POST", "/v1/mlx/models/load", "another mlx-server instance"),
        ("DELETE", "/v1/mlx/models/tiny-test-model", "one model"),
        ("DELETE", "/v1/mlx/models/mlx-community/Llama-3", "one model"),
        ("POST", "/v1/mlx/models/tiny-test-model/reload", "Restart"),
        ("POST", "/v1/mlx/models/org/name/reload", "Restart"),
        ("GET", "/v1/models/tiny-test-model", "GET /v1/models lists"),
        ("GET", "/v1/models/org/name", "GET /v1/models lists"),
    ],
)
def test_removed_endpoints_are_gone(client, method, path, words):
    result = client.simulate_request(method, path, json={"model_path": "/x"})
    assert result.status_code == 410
    validate(result.json, "ErrorResponse")
    error = result.json["error"]
    assert error["code"] == "endpoint_removed"
    assert "one model, fixed at startup" in error["message"]
    assert words in error["message"]


def test_unknown_route_is_404_json(client):
    result = client.simulate_get("/v1/nothing")
    assert result.status_code == 404
    validate(result.json, "ErrorResponse")
    assert result.json["error"]["type"] == "invalid_request_error"
    assert "/v1/nothing" in result.json["error"]["message"]


def test_unknown_model_management_post_is_404(client):
    assert client.simulate_post("/v1/mlx/models/foo").status_code == 404


@pytest.mark.parametrize(
    "method, path", [("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("PUT", "/v1/completions")]
)
def test_wrong_method_is_405_json(client, method, path):
    result = client.simulate_request(method, path)
    assert result.status_code == 405
    validate(result.json, "ErrorResponse")
    assert "allow" in result.headers


def test_unexpected_exception_is_500_json_without_traceback(engine, tok, caplog):
    def broken_status(timeout_s: float = 5.0):
        raise RuntimeError("secret internals")

    engine.status = broken_status  # type: ignore[method-assign]
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
    result = client.simulate_get("/v1/mlx/status")
    assert result.status_code == 500
    validate(result.json, "ErrorResponse")
    assert "secret internals" not in result.text and "Traceback" not in result.text
    assert result.json["error"]["type"] == "server_error"
    assert "secret internals" in caplog.text  # logged instead


def test_create_app_loads_tokenizer_from_model_path(tmp_path):
    path = write_tokenizer_dir(tmp_path / "model")
    engine = FakeEngineClient(model_info=make_model_info(model_path=str(path)))
    client = falcon.testing.TestClient(create_app(engine, settings=frontend_settings()))
    result = client.simulate_post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert result.status_code == 200, result.text


GENERATIONS = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": "m", "prompt": "hi", "max_tokens": 2},
    "/v1/messages": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/responses": {"model": "m", "input": "hi", "max_output_tokens": 2},
}


def _notices(engine: FakeEngineClient) -> list[str]:
    return [kind for kind, _ in engine.events if kind in ("announce", "submit", "settle")]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", list(GENERATIONS))
def test_a_generation_is_announced_before_its_submit_and_settled_after_it(client, engine, path, stream):
    result = client.simulate_post(path, json={**GENERATIONS[path], "stream": stream})
    assert result.status_code == 200, result.text
    # _submit_all settles after the last submit; the middleware's settle at the end is a no-op then.
    assert _notices(engine) == ["announce", "submit", "settle", "settle"]


def test_a_generation_that_fails_before_its_submit_is_settled_too(client, engine):
    result = client.simulate_post("/v1/chat/completions", json={"model": "m", "messages": "not a list"})
    assert result.status_code == 400
    assert _notices(engine) == ["announce", "settle"]


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/messages/count_tokens", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/tokenize", {"prompt": "hi"}),
    ],
)
def test_other_routes_announce_nothing(client, engine, method, path, body):
    assert client.simulate_request(method, path, json=body).status_code == 200
    assert "announce" not in _notices(engine)
