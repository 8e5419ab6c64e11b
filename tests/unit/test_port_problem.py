"""deploy.supervisor.port_problem: the HTTP port is checked before anything starts."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import pytest

from deploy.supervisor import port_problem
from tests.integration.server import free_port


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A socket listening on a free port of 127.0.0.1, as another server's would be."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_a_free_port_has_no_problem():
    assert port_problem("127.0.0.1", free_port()) is None


def test_a_port_another_server_listens_on_is_named(listener: socket.socket):
    port = listener.getsockname()[1]
    assert port_problem("127.0.0.1", port) == (
        f"port {port} on 127.0.0.1 is already in use (another server or mlx-server instance): choose another --port"
    )


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT groups as Linux forms them")
def test_a_port_held_by_an_instance_whose_workers_share_it_is_in_use():
    # What a running mlx-server's workers hold on Linux (frontend.gunicorn_conf.reuse_port):
    # a second instance doing the same could join them; the probe must not.
    with socket.socket() as worker:
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", 0))
        worker.listen()
        assert "already in use" in (port_problem("127.0.0.1", worker.getsockname()[1]) or "")


def test_a_host_that_does_not_resolve_is_named():
    problem = port_problem("no-such-host.invalid", free_port())
    assert problem is not None and problem.startswith("cannot bind no-such-host.invalid:")


def test_the_probe_leaves_the_port_free():
    port = free_port()
    assert port_problem("127.0.0.1", port) is None
    assert port_problem("127.0.0.1", port) is None  # and again: nothing was left bound
