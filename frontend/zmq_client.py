"""ZeroMQ implementation of EngineClient, one per gunicorn worker process.

ZeroMQ sockets are not thread-safe, so one I/O thread owns the DEALER. Request
threads hand it encoded messages through per-thread inproc PUSH sockets; the
I/O thread routes incoming deltas to per-request queues. A second DEALER, send
only and behind a lock, carries what cannot wait for the I/O thread's turn:
the announcement that a generation request began (``announce``).

Under gunicorn's gevent worker (the server's), threading and queue are
gevent's: the "threads" are greenlets of one OS thread, so the sockets must be
pyzmq's green ones, which wait in gevent's loop instead of blocking the process.
Unpatched (tests, scripts), plain threads and plain sockets.

Engine liveness: a socket monitor reports the moment the engine's connection
drops (process death), so in-flight requests fail at once instead of hanging;
heartbeat pings catch an engine that is alive but wedged. When the engine
comes back (restarted by the supervisor, or started later by a Procfile
runner) the DEALER reconnects by itself and the client handshakes again.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from frontend.engine_client import ClientDisconnected, EngineOverloaded, EngineUnavailable, RequestTimedOut
from ipc import codec
from ipc.messages import (
    PROTOCOL_VERSION,
    Abort,
    Arriving,
    EngineStatus,
    Generate,
    Hello,
    ModelInfo,
    Ping,
    Pong,
    Rejected,
    Settled,
    StatusQuery,
    StepOutputs,
    TokenDelta,
    Welcome,
)
from ipc.sockets import make_dealer

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
# No pong for this long while still connected: the engine is wedged. Its death
# is seen at once by the socket monitor; this only catches a live process that
# stopped answering, so it must exceed any single engine step (a first-request
# kernel compile on a GPU, a long prefill chunk of a big model).
ENGINE_SILENCE_LIMIT_S = 120.0
# Connected but not (or no longer) welcomed: say Hello again this often.
HELLO_RETRY_S = 1.0
IO_POLL_MS = 100
# A watched request checks for a vanished client this often while it waits.
CANCEL_POLL_S = 0.2

_Item = TokenDelta | EngineUnavailable

# The announcement of the request this thread (greenlet) handles, until it is settled.
_ANNOUNCED: ContextVar[int | None] = ContextVar("announced", default=None)


def _zmq_flavour() -> types.ModuleType:
    """pyzmq's green sockets where gevent has monkey-patched the process (gunicorn's
    gevent worker did it; imported only then), its plain ones otherwise."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        from zmq import green

        return green
    return zmq


class _Stream:
    """One request's deltas; closing it before its final delta aborts it."""

    def __init__(self, client: ZmqEngineClient, request_id: str, timeout_s: float) -> None:
        self.request_id = request_id
        self._client = client
        self._timeout_s = timeout_s
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._forwarded = threading.Event()
        self._done = False
        self._started = time.monotonic()
        self._cancelled: Callable[[], bool] | None = None
        self._next_cancel_check = 0.0
        # An item ``wait`` took off the queue, for the iteration to return first.
        self._ready: _Item | None = None

    def watch(self, cancelled: Callable[[], bool]) -> None:
        self._cancelled = cancelled

    def put(self, item: _Item) -> None:
        self._queue.put(item)

    def forwarded(self, timeout_s: float) -> bool:
        return self._forwarded.wait(timeout_s)

    def wait(self, timeout_s: float) -> bool:
        if self._done or self._ready is not None:
            return True
        remaining = self._started + self._timeout_s - time.monotonic()
        if remaining <= 0:
            return True  # iterating raises the request timeout at once
        try:
            self._ready = self._next(min(timeout_s, remaining))
        except queue.Empty:
            return False
        return True

    def __iter__(self) -> Iterator[TokenDelta]:
        deadline = self._started + self._timeout_s
        while not self._done:
            try:
                item, self._ready = self._ready, None
                if item is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise queue.Empty
                    item = self._next(remaining)
            except queue.Empty:
                self.close()  # aborts it in the engine
                raise RequestTimedOut(f"the request ran past the {self._timeout_s:.0f} s request timeout") from None
            if isinstance(item, EngineUnavailable):
                self._done = True
                raise item
            if item.finish_reason is not None:
                self._done = True
                self._client._forget(self.request_id)
            yield item

    def _next(self, remaining: float) -> _Item:
        if self._cancelled is None:
            return self._queue.get(timeout=remaining)
        deadline = time.monotonic() + remaining
        while True:
            # Checked every CANCEL_POLL_S, whether tokens flow or the request waits.
            now = time.monotonic()
            if now >= self._next_cancel_check:
                self._next_cancel_check = now + CANCEL_POLL_S
                if self._cancelled():
                    self.close()
                    raise ClientDisconnected(f"client went away; request {self.request_id} aborted")
            try:
                return self._queue.get(timeout=max(0.0, min(deadline, self._next_cancel_check) - now))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._client._abort(self.request_id)

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZmqEngineClient:
    def __init__(
        self,
        address: str,
        *,
        request_timeout_s: float,
        max_queued_requests: int,
        silence_limit_s: float = ENGINE_SILENCE_LIMIT_S,
    ) -> None:
        self._max_queued = max_queued_requests
        self._engine_queued = 0  # as of the last pong (<= 0.5 s old)
        self._address = address
        self._silence_limit_s = silence_limit_s
        self._request_timeout_s = request_timeout_s
        self._zmq = _zmq_flavour()
        self._ctx = self._zmq.Context()
        self._identity = f"w{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        self._inbox = f"inproc://engine-client-{self._identity.decode()}"
        # One PUSH per OS thread: greenlets of one thread share it (a send is
        # never interrupted), threads each need their own (sockets are not thread-safe).
        self._pushes: dict[int, zmq.Socket] = {}
        self._streams: dict[str, _Stream] = {}
        # Submitted streams, oldest first, until the I/O loop has sent their Generate.
        self._unforwarded: collections.deque[_Stream] = collections.deque()
        self._status_waiters: dict[str, queue.SimpleQueue[EngineStatus]] = {}
        self._lock = threading.Lock()
        self._model: ModelInfo | None = None
        self._ready = threading.Event()
        self._rejected: str | None = None
        self._alive = False
        self._connected = False
        self._last_heard = time.monotonic()
        self._nonce = itertools.count()
        # Arriving goes out on a DEALER of its own, from the request's own thread
        # (greenlet) and at once: the I/O loop's DEALER cannot be shared (a send
        # from another greenlet can swallow the wake-up its poll waits for), and
        # the I/O loop runs only when a worker's request greenlets have all yielded.
        self._arrivals = self._ctx.socket(zmq.DEALER)
        self._arrivals.setsockopt(zmq.LINGER, 0)
        self._arrivals.setsockopt(zmq.IDENTITY, self._identity + b"/arrivals")
        # Queued only to a connected engine: an announcement must not reach a
        # restarted engine that never gets its Settled.
        self._arrivals.setsockopt(zmq.IMMEDIATE, 1)
        self._arrivals.connect(address)
        self._arrivals_lock = threading.Lock()
        self._announcements = itertools.count()
        # The inproc PULL must exist before any PUSH connects to it.
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(self._inbox)
        self._handlers: dict[type, Callable[[object], None]] = {
            StepOutputs: self._on_outputs,
            EngineStatus: self._on_status,
            Pong: self._on_pong,
            Welcome: self._on_welcome,
            Rejected: self._on_rejected,
        }
        self._thread = threading.Thread(target=self._io_loop, name="engine-io", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the first handshake succeeded (True) or timeout (False)."""
        return self._ready.wait(timeout_s)

    # ------------------------------------------------------------------ public API

    @property
    def model(self) -> ModelInfo:
        if self._model is None:
            raise EngineUnavailable(self._rejected or "the engine is still starting")
        return self._model

    @property
    def alive(self) -> bool:
        return self._alive

    def announce(self) -> None:
        if not self._alive or _ANNOUNCED.get() is not None:
            return
        seq = next(self._announcements)
        try:
            with self._arrivals_lock:
                self._arrivals.send(codec.encode(Arriving(self._identity.decode(), seq)), zmq.NOBLOCK)
        except zmq.Again:
            return  # no engine connected: nothing to announce to
        _ANNOUNCED.set(seq)

    def settle(self) -> None:
        seq = _ANNOUNCED.get()
        if seq is not None:
            _ANNOUNCED.set(None)
            # Through the I/O loop, after the request's Generates: the same frame set.
            self._post(codec.encode(Settled(seq)))

    def submit(self, request: Generate) -> _Stream:
        if not self._alive:
            raise EngineUnavailable("the engine is not available")
        if self._engine_queued >= self._max_queued:
            raise EngineOverloaded(f"{self._engine_queued} requests are already waiting; retry shortly")
        stream = _Stream(self, request.request_id, self._request_timeout_s)
        with self._lock:
            self._streams[request.request_id] = stream
        # Counted before it is posted: a count the I/O loop takes then covers
        # every Generate in the pipe (and at worst one about to be, told early).
        self._unforwarded.append(stream)
        self._post(codec.encode(request))
        return stream

    def status(self, timeout_s: float = 5.0) -> EngineStatus:
        if not self._alive:
            raise EngineUnavailable("the engine is not available")
        query_id = uuid.uuid4().hex
        waiter: queue.SimpleQueue[EngineStatus] = queue.SimpleQueue()
        with self._lock:
            self._status_waiters[query_id] = waiter
        try:
            self._post(codec.encode(StatusQuery(query_id)))
            return waiter.get(timeout=timeout_s)
        except queue.Empty:
            raise EngineUnavailable("the engine did not answer a status query") from None
        finally:
            with self._lock:
                self._status_waiters.pop(query_id, None)

    # ------------------------------------------------------------------ internals

    def _post(self, payload: bytes) -> None:
        thread = threading.get_native_id()
        push = self._pushes.get(thread)
        if push is None:
            push = self._ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._inbox)
            self._pushes[thread] = push
        push.send(payload, copy=False)

    def _abort(self, request_id: str) -> None:
        self._forget(request_id)
        if self._alive:
            self._post(codec.encode(Abort([request_id])))

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def _io_loop(self) -> None:
        dealer = make_dealer(self._ctx, self._identity)
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        dealer.connect(self._address)
        poller = self._zmq.Poller()
        for sock in (dealer, self._pull, monitor):
            poller.register(sock, zmq.POLLIN)
        next_ping = next_hello = 0.0
        while True:
            for sock, _ in poller.poll(IO_POLL_MS):
                if sock is self._pull:
                    # What the request greenlets queued goes as one frame set: the
                    # engine receives a burst whole and prefills it in one forward.
                    forwarding = len(self._unforwarded)
                    queued = [self._pull.recv(copy=False)]
                    while self._pull.poll(0):
                        queued.append(self._pull.recv(copy=False))
                    dealer.send_multipart(queued, copy=False)
                    for _ in range(forwarding):
                        self._unforwarded.popleft()._forwarded.set()
                elif sock is dealer:
                    while dealer.poll(0):
                        self._dispatch(dealer.recv(copy=False).buffer)
                else:
                    self._on_connection_event(recv_monitor_message(monitor)["event"], dealer)
            now = time.monotonic()
            if self._connected and now >= next_ping:
                dealer.send(codec.encode(Ping(next(self._nonce))))
                next_ping = now + HEARTBEAT_INTERVAL_S
            if self._connected and not self._alive and self._rejected is None and now >= next_hello:
                # A missed handshake, or an engine that answers again after a silence.
                self._send_hello(dealer)
                next_hello = now + HELLO_RETRY_S
            if self._alive and now - self._last_heard > self._silence_limit_s:
                failed = self._engine_lost(f"the engine sent nothing for {self._silence_limit_s:.0f} s")
                if failed:  # still connected: don't leave it generating for nobody
                    dealer.send(codec.encode(Abort(failed)))

    def _on_connection_event(self, event: int, dealer: zmq.Socket) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._connected = True
            self._last_heard = time.monotonic()
            # A (re)connected engine must learn who we are and that we speak its protocol.
            self._send_hello(dealer)
        elif event == zmq.EVENT_DISCONNECTED:
            self._connected = False
            if self._alive:
                self._engine_lost("the engine connection was lost")

    def _send_hello(self, dealer: zmq.Socket) -> None:
        dealer.send(codec.encode(Hello(self._identity.decode(), PROTOCOL_VERSION)))

    def _dispatch(self, payload: memoryview) -> None:
        try:
            message = codec.decode_engine_message(payload)
        except msgspec.DecodeError:
            log.warning("dropping undecodable message from the engine")
            return
        self._last_heard = time.monotonic()
        self._handlers[type(message)](message)

    def _on_welcome(self, message: Welcome) -> None:
        if self._model is not None and not self._alive:
            log.info("engine is back")
        self._model = message.model
        self._rejected = None
        self._alive = True
        self._ready.set()

    def _on_rejected(self, message: Rejected) -> None:
        log.error("the engine rejected this worker: %s", message.reason)
        self._rejected = f"the engine rejected this worker: {message.reason}"
        self._alive = False

    def _on_outputs(self, message: StepOutputs) -> None:
        streams = self._streams
        for delta in message.deltas:
            stream = streams.get(delta.request_id)
            if stream is not None:
                stream.put(delta)

    def _on_status(self, message: EngineStatus) -> None:
        with self._lock:
            waiter = self._status_waiters.get(message.query_id)
        if waiter is not None:
            waiter.put(message)

    def _on_pong(self, message: Pong) -> None:
        self._engine_queued = message.queued_requests

    def _engine_lost(self, why: str) -> list[str]:
        """Fail every in-flight request; return their ids."""
        log.error("%s: failing in-flight requests until it is back", why)
        self._alive = False
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(EngineUnavailable(why))
        return list(streams)
