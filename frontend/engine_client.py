"""The interface the HTTP resources use to reach the engine.

Resources depend only on ``EngineClient``; production passes the ZeroMQ
client (``frontend.zmq_client``), unit tests pass a fake.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from ipc.messages import EngineStatus, Generate, ModelInfo, TokenDelta


class EngineUnavailable(Exception):
    """The engine is down, restarting or did not answer in time (HTTP 503)."""


class EngineOverloaded(EngineUnavailable):
    """The engine's queue is full: try again shortly (HTTP 429)."""


class ClientDisconnected(Exception):
    """The HTTP client went away; its request was aborted in the engine."""


class RequestTimedOut(EngineUnavailable):
    """The request ran past the per-request timeout and was aborted (HTTP 504)."""


class RequestStream(Protocol):
    """The engine's answer to one Generate, delta by delta.

    Iterating yields TokenDeltas and stops after the final one (the one with
    ``finish_reason`` set). It raises EngineUnavailable if the engine dies or
    stays silent past the client's timeout. ``close()`` aborts the request in
    the engine unless it already ended; it is idempotent and must always be
    called (use ``with``).
    """

    request_id: str

    def __iter__(self) -> Iterator[TokenDelta]: ...

    def close(self) -> None: ...

    def forwarded(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until the request has left this process for
        the engine: True when it has, False when the time ran out first."""
        ...

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the next delta without taking it: True
        when iterating would not block (a delta, the end or an error is
        there), False when the time ran out first."""
        ...

    def watch(self, cancelled: Callable[[], bool]) -> None:
        """While iterating, poll ``cancelled``; when true, close (abort) and raise ClientDisconnected."""
        ...

    def __enter__(self) -> RequestStream: ...

    def __exit__(self, *exc: object) -> None: ...


class EngineClient(Protocol):
    @property
    def model(self) -> ModelInfo:
        """The loaded model's facts; raises EngineUnavailable before the first handshake."""
        ...

    @property
    def alive(self) -> bool:
        """Whether the engine is connected and answering right now."""
        ...

    def announce(self) -> None:
        """A generation request began in this thread (greenlet): tell the engine
        at once, ahead of the request itself. Best effort; settled by ``settle``."""
        ...

    def settle(self) -> None:
        """This thread's announced request has submitted what it will (maybe
        nothing): call after its last submit or when it fails. Idempotent."""
        ...

    def submit(self, request: Generate) -> RequestStream: ...

    def status(self, timeout_s: float = 5.0) -> EngineStatus: ...
