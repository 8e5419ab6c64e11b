"""API keys, CORS, the drain gate and the health endpoints, against a fake engine."""

from __future__ import annotations

import falcon.testing
import pytest

from frontend.app import create_app
from tests.openai_schema import validate
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, write_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def client_for(tokenizer_dir, engine=None, **settings) -> falcon.testing.TestClient:
    from frontend.tokenization import Tokenization

    engine = engine or FakeEngineClient()
    app = create_app(engine, Tokenization.from_pretrained(str(tokenizer_dir)), settings=frontend_settings(**settings))
    return falcon.testing.TestClient(app)


def test_no_keys_configured_means_open(tokenizer_dir):
    assert client_for(tokenizer_dir).simulate_get("/v1/models").status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic c2VjcmV0", "Bearer secret-2x", "secret-1"])
def test_bad_or_missing_key_is_401_openai_error(tokenizer_dir, header):
    client = client_for(tokenizer_dir, api_keys=("secret-1", "secret-2"))
    headers = {"Authorization": header} if header else {}
    for path in ("/v1/models", "/v1/mlx/status", "/v1/chat/completions"):
        r = client.simulate_get(path, headers=headers)
        assert r.status_code == 401
        validate(r.json, "ErrorResponse")
        assert r.json["error"]["code"] == "invalid_api_key"


def test_every_configured_key_is_accepted_and_health_stays_open(tokenizer_dir):
    client = client_for(tokenizer_dir, api_keys=("secret-1", "secret-2"))
    for key in ("secret-1", "secret-2"):
        assert client.simulate_get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.simulate_get("/health").status_code == 200


def test_cors_is_off_unless_origins_are_configured(tokenizer_dir):
    origin = {"Origin": "https://app.example"}
    off = client_for(tokenizer_dir).simulate_get("/v1/models", headers=origin)
    assert "Access-Control-Allow-Origin" not in off.headers
    on = client_for(tokenizer_dir, cors_origins=("https://app.example",)).simulate_get("/v1/models", headers=origin)
    assert on.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_readiness_follows_the_engine(tokenizer_dir):
    engine = FakeEngineClient()
    client = client_for(tokenizer_dir, engine)
    assert client.simulate_get("/health/ready").status_code == 200
    engine.available = False
    r = client.simulate_get("/health/ready")
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert client.simulate_get("/health").status_code == 200


def test_drain_flag_turns_new_requests_away(tokenizer_dir, tmp_path):
    flag = tmp_path / "draining"
    client = client_for(tokenizer_dir, drain_flag=str(flag))
    assert client.simulate_get("/v1/models").status_code == 200
    flag.touch()
    r = client.simulate_post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.headers["Retry-After"]
    validate(r.json, "ErrorResponse")
    assert client.simulate_get("/health/ready").json["status"] == "draining"
    status = client.simulate_get("/v1/mlx/status")
    assert status.status_code == 200 and status.json["engine"]["state"] == "draining"
    assert client.simulate_get("/health").status_code == 200
