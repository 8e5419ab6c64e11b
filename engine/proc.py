"""The engine's socket loop: ROUTER in, dispatch table, one step, one send per worker.

While requests run, the socket is drained without blocking between steps;
when idle, the loop blocks on the socket (with a short timeout so it notices
a stop request or a dead parent).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from engine.core import Scheduler
from engine.group import GROUP_IDLE_TICK_S, GroupLink
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
    Welcome,
)
from ipc.sockets import bind_router

log = logging.getLogger(__name__)

# How long an idle engine waits on its socket before re-checking stop flags.
IDLE_POLL_MS = 200
# Frontend workers ping every 0.5 s; one silent this long is gone (killed,
# crashed): its requests are aborted so their batch slots are freed.
WORKER_SILENCE_LIMIT_S = 5.0
# Silent workers and a dead parent (os.getppid, a syscall) are looked for
# this often, not on every step.
HOUSEKEEPING_INTERVAL_S = 1.0


class EngineLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        model: ModelInfo,
        address: str,
        restarts: int = 0,
        worker_silence_limit_s: float = WORKER_SILENCE_LIMIT_S,
        group: GroupLink | None = None,
    ) -> None:
        # Rank 0 of a sharded engine: the scheduler sends its plans through this link.
        self._group = group
        self._restarts = restarts
        self._worker_silence_limit_s = worker_silence_limit_s
        self._scheduler = scheduler
        self._model = model
        self._ctx = zmq.Context()
        self._sock = bind_router(self._ctx, address)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._stop = False
        # A group's rank 0 wakes every tick while idle to let its followers sleep.
        self._idle_poll_ms = IDLE_POLL_MS if group is None else int(GROUP_IDLE_TICK_S * 1000)
        self._parent_pid = os.getppid()
        self._last_seen: dict[bytes, float] = {}
        self._next_housekeeping = 0.0
        self._steps = 0
        self._step_seconds = 0.0
        self._handlers: dict[type, Callable[[bytes, Any], None]] = {
            Hello: self._on_hello,
            Generate: self._on_generate,
            Arriving: self._on_arriving,
            Settled: self._on_settled,
            Abort: self._on_abort,
            StatusQuery: self._on_status,
            Ping: self._on_ping,
        }

    # ------------------------------------------------------------------ control

    def request_stop(self, *_: object) -> None:
        """Signal handler: only record (the loop acts on the flag)."""
        self._stop = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _parent_gone(self) -> bool:
        # Reparenting means whoever started us died: don't hold the model's memory.
        return os.getppid() != self._parent_pid

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        log.info("engine ready (pid %d)", os.getpid())
        try:
            while not self._stop:
                self._drain(self._scheduler.wait_s())
                # Right after draining: pings that queued during a long step are
                # counted, so only a worker that really stopped looks silent.
                if time.monotonic() >= self._next_housekeeping:
                    if self._parent_gone():
                        log.warning("parent process exited; engine stopping")
                        break
                    self._forget_silent_workers()
                    if self._group is not None:
                        # Busy or idle: keeps each rank's memory fresh in the status,
                        # and a rank that died or hangs shows within a second.
                        self._group.poll(self._scheduler.memory())
                if self._scheduler.has_work():
                    self._step()
                elif self._group is not None:
                    self._group.idle()
        finally:
            self._sock.close()
            self._ctx.term()
            log.info("engine stopped")

    def _drain(self, wait_s: float | None) -> None:
        """Read every frame set that has come; first wait up to ``wait_s`` for
        one (None: idle, up to the idle poll)."""
        # One Poller for the loop's life (Socket.poll builds one per call).
        # zmq counts whole milliseconds: round up, or a short wait would spin.
        timeout = self._idle_poll_ms if wait_s is None else math.ceil(wait_s * 1000)
        while self._poller.poll(timeout):
            timeout = 0
            # [worker identity, message, message, ...]: a worker forwards everything
            # its requests queued as one frame set, so a burst is never split by a step.
            frames = self._sock.recv_multipart(copy=False)
            if len(frames) < 2:
                log.warning("dropping malformed frame set (%d parts)", len(frames))
                continue
            worker = frames[0].bytes
            self._last_seen[worker] = time.monotonic()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("t=%.1f ms: %d message(s) from %r", time.monotonic() * 1000 % 1e6, len(frames) - 1, worker)
            for frame in frames[1:]:
                self._handle(worker, frame.buffer)

    def _handle(self, worker: bytes, payload: memoryview) -> None:
        try:
            message = codec.decode_frontend_message(payload)
        except msgspec.DecodeError as exc:
            log.warning("dropping undecodable message from %r: %s", worker, exc)
            return
        try:
            self._handlers[type(message)](worker, message)
        except Exception:  # one bad message must not take the engine down
            log.exception("handling %s from %r failed", type(message).__name__, worker)

    def _forget_silent_workers(self) -> None:
        now = time.monotonic()
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
        for worker, seen in list(self._last_seen.items()):
            if now - seen > self._worker_silence_limit_s:
                del self._last_seen[worker]
                if self._scheduler.drop_worker(worker):
                    log.warning("worker %r went silent: aborted its requests", worker)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            with self._group.step() if self._group is not None else contextlib.nullcontext():
                outputs = self._scheduler.step()
        except Exception as exc:
            if self._group is not None:
                # The ranks no longer agree on the batch (or one is gone): the
                # engine ends, and the supervisor restarts the whole group.
                raise
            # One bad step must not take a single-process engine down.
            log.exception("engine step failed; failing the running requests")
            self._scheduler.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            outputs = self._scheduler.step()
        for worker, deltas in outputs.items():
            if deltas:
                self._send(worker, StepOutputs(deltas))
        self._scheduler.remember_finished()
        self._steps += 1
        self._step_seconds += time.perf_counter() - started

    def _send(self, worker: bytes, message: msgspec.Struct) -> None:
        self._sock.send_multipart([worker, codec.encode(message)], copy=False)

    # ------------------------------------------------------------------ handlers

    def _on_hello(self, worker: bytes, msg: Hello) -> None:
        if msg.protocol_version != PROTOCOL_VERSION:
            log.error(
                "worker %s speaks protocol %d, engine speaks %d",
                msg.worker_id,
                msg.protocol_version,
                PROTOCOL_VERSION,
            )
            self._send(worker, Rejected(f"protocol {msg.protocol_version} != {PROTOCOL_VERSION}"))
            return
        log.debug("worker %s connected", msg.worker_id)
        self._send(worker, Welcome(PROTOCOL_VERSION, self._model))

    def _on_generate(self, worker: bytes, msg: Generate) -> None:
        self._scheduler.add(worker, msg)

    def _on_arriving(self, worker: bytes, msg: Arriving) -> None:
        # From the worker's second socket: the request is counted as its main one's.
        self._scheduler.arriving(msg.worker.encode(), msg.seq)

    def _on_settled(self, worker: bytes, msg: Settled) -> None:
        self._scheduler.settled(worker, msg.seq)

    def _on_abort(self, worker: bytes, msg: Abort) -> None:
        self._scheduler.abort(msg.request_ids)

    def _on_ping(self, worker: bytes, msg: Ping) -> None:
        s = self._scheduler
        self._send(worker, Pong(msg.nonce, s.running - s.queued, s.queued))

    def _on_status(self, worker: bytes, msg: StatusQuery) -> None:
        s = self._scheduler
        active, peak = s.memory()
        self._send(
            worker,
            EngineStatus(
                query_id=msg.query_id,
                uptime_s=time.monotonic() - s.stats.started_at,
                running_requests=s.running - s.queued,
                queued_requests=s.queued,
                tokens_generated=s.stats.tokens_generated,
                prompt_tokens_processed=s.stats.prompt_tokens_processed,
                requests_finished=s.stats.requests_finished,
                prompt_cache_entries=s.prefix_cache_entries,
                prompt_cache_bytes=s.prefix_cache_bytes,
                prompt_cache_hits=s.stats.prompt_cache_hits,
                prompt_cache_hit_tokens=s.stats.prompt_cache_hit_tokens,
                active_memory_bytes=active,
                peak_memory_bytes=peak,
                restarts=self._restarts,
                steps=self._steps,
                step_seconds=self._step_seconds,
                kv_budget_bytes=s.kv_budget_bytes,
                kv_reserved_bytes=s.kv_reserved_bytes,
                kv_bytes_per_token=s.kv_bytes_per_token,
                kv_bits=s.kv_quantization[0],
                kv_group_size=s.kv_quantization[1],
                group=None if self._group is None else self._group.status,
            ),
        )
