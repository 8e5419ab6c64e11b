from __future__ import annotations

import json

import openai
import pytest

from tests.integration.server import ServerProcess


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, server_logs):
    """One real mlx-server on the tiny model, shared by a test module."""
    with ServerProcess(tiny_model_dir, server_logs) as server:
        yield server


@pytest.fixture(scope="module")
def base(tiny_server):
    return tiny_server.base_url


@pytest.fixture(scope="module")
def client(tiny_server):
    """The official openai client on tiny_server, without retries."""
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def no_eos(tiny_model_dir):
    """logit_bias that bans the tiny model's EOS ids, so requests run to max_tokens."""
    eos = json.loads((tiny_model_dir / "config.json").read_text())["eos_token_id"]
    return {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}
