"""Fixtures shared by the frontend unit tests: a tokenizer, a fake engine, a test client."""

from __future__ import annotations

import falcon.testing
import pytest

from frontend.app import create_app
from frontend.tokenization import Tokenization
from tests.unit.defaults import frontend_settings
from tests.unit.fakes import FakeEngineClient, write_tokenizer_dir


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenization:
    return Tokenization.from_pretrained(write_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def engine() -> FakeEngineClient:
    return FakeEngineClient()


@pytest.fixture
def client(engine: FakeEngineClient, tok: Tokenization) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings()))
