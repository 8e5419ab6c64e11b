from __future__ import annotations

import pytest

from tests.integration.server import ServerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, server_logs):
    """One real mlx-server on the tiny model, shared by a test module."""
    with ServerProcess(tiny_model_dir, server_logs) as server:
        yield server
