"""Notice a client that went away while a non-streaming request runs.

A stream notices at its next write; a plain request writes nothing until the
end, so we look at its socket: readable with nothing to read means closed.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

import falcon

# gunicorn's workers put the client socket in the WSGI environ under this key.
GUNICORN_SOCKET_KEY = "gunicorn.socket"


def peer_closed(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        # Readable: either the next pipelined request's bytes, or EOF (closed).
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # reset, or already closed on our side
        return True


def client_gone_check(req: falcon.Request) -> Callable[[], bool] | None:
    sock = req.env.get(GUNICORN_SOCKET_KEY)
    if not isinstance(sock, socket.socket):
        return None  # not under gunicorn (unit tests): nothing to watch
    return lambda: peer_closed(sock)
