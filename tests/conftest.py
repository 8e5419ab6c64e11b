"""Session-wide models (the generated tiny model + LoRA adapter, and SmolLM2) and the markers.

The tiny model is rebuilt per session (milliseconds). SmolLM2 is converted
once into a persistent cache and reused between runs. A failing build fails
the fixture (and the tests that use it): nothing is skipped silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploy.demo_model import ensure_demo_model
from tests.model_factory import build_lora_adapter, build_tiny_model

INTEGRATION_DIR = Path(__file__).parent / "integration"
# Fixtures that convert SmolLM2 on a cold cache (minutes on CPU): a test using one is slow.
SLOW_FIXTURES = {"smollm2_dir"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark by what a test needs: real processes (everything under integration/), SmolLM2."""
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)
        if SLOW_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def _test_cache_dir() -> Path:
    env = os.environ.get("MLX_SERVER_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlx-server-tests"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ~34M-parameter "bench" size: tens of tokens/s on CPU, so a request
    reliably outlives the fault a test injects while it runs."""
    return build_tiny_model(tmp_path_factory.mktemp("slow-model"), size="bench")


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-adapter"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny size as qwen2, which mlx-lm shards both ways (tensor and pipeline)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), architecture="qwen2")


@pytest.fixture(scope="session")
def tiny_qwen2_adapter_dir(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora_adapter(tiny_qwen2_dir, tmp_path_factory.mktemp("tiny-qwen2-adapter"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return ensure_demo_model(_test_cache_dir())
