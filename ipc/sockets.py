"""ZeroMQ socket helpers shared by the engine (ROUTER) and frontend (DEALER)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import zmq

# Unsent messages are dropped this long after close(), so a dead peer never
# blocks a shutdown.
LINGER_MS = 0
ENGINE_SOCKET_NAME = "engine.sock"


def make_private_runtime_dir(prefix: str = "mlx-server-") -> Path:
    """A fresh 0700 directory for the ipc:// socket: only this user can connect."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o700)
    return path


def default_ipc_address(runtime_dir: Path) -> str:
    return f"ipc://{runtime_dir / ENGINE_SOCKET_NAME}"


def bind_router(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    # Unroutable replies (a worker that went away) are dropped, not raised.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(address)
    return sock


def make_dealer(ctx: zmq.Context, identity: bytes) -> zmq.Socket:
    """A configured, not yet connected DEALER (attach a monitor before connecting
    it, or the first connection event can be missed)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def connect_dealer(ctx: zmq.Context, address: str, identity: bytes) -> zmq.Socket:
    sock = make_dealer(ctx, identity)
    sock.connect(address)
    return sock
