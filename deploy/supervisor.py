"""The mlx-server supervisor: engine first, then gunicorn, then watch both.

Signal handlers only record; the loop acts. Children run in their own
sessions so a terminal's Ctrl-C reaches only us, and we stop them in order:
gunicorn first (it drains in-flight HTTP requests), then the engine.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import zmq

from deploy.settings import Settings
from ipc import codec, runtime
from ipc.logging_setup import configure as configure_logging
from ipc.messages import PROTOCOL_VERSION, EngineStatus, Hello, ModelInfo, Rejected, StatusQuery, Welcome
from ipc.sockets import connect_dealer, default_ipc_address, make_private_runtime_dir

log = logging.getLogger("mlx-server")

SUPERVISE_INTERVAL_S = 0.2
ENGINE_STOP_TIMEOUT_S = 10.0
# After our own drain, gunicorn gets this long to close what still runs.
WEB_STOP_TIMEOUT_S = 5.0
DRAIN_FLAG_NAME = "draining"
# Backoff between engine restarts; the last value repeats.
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# An engine that stayed up this long resets the crash count.
ENGINE_STABLE_S = 120.0


class StartupError(Exception):
    """Startup failed; the message is one line for the user."""


class _StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


def engine_command(restarts: int = 0) -> list[str]:
    # Everything else comes from the config in the environment (child_environment).
    return [sys.executable, "-m", "engine", "--restarts", str(restarts)]


def web_command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn",
        "--config", "python:frontend.gunicorn_conf",
        "--bind", f"{settings.host}:{settings.port}",
        "--workers", str(settings.workers),
        "--worker-connections", str(settings.worker_connections),
        "--log-level", settings.log_level,
        "--graceful-timeout", str(int(WEB_STOP_TIMEOUT_S)),
        # gunicorn's control socket sits at one fixed path per user: several
        # instances on one machine would fight over it, and we don't use it.
        "--no-control-socket",
        "frontend.wsgi:build_app()",
    ]  # fmt: skip


def child_environment(config: runtime.RuntimeConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the engine and of gunicorn: ours plus the config, encoded once."""
    return {
        **environ,
        runtime.CONFIG_ENV: runtime.encode(config),
        # The frontend uses transformers for tokenizers only; its "PyTorch
        # was not found" advisory is noise for every worker.
        "TRANSFORMERS_VERBOSITY": "error",
    }


def wait_for_engine(address: str, engine: subprocess.Popen, timeout_s: float, stop: _StopFlag) -> ModelInfo:
    """Handshake with the engine; fail fast if it exits or we are told to stop."""
    ctx = zmq.Context()
    sock = connect_dealer(ctx, address, f"supervisor-{os.getpid()}".encode())
    try:
        sock.send(codec.encode(Hello("supervisor", PROTOCOL_VERSION)))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop:
                raise StartupError("stopped by signal during startup")
            if engine.poll() is not None:
                raise StartupError(
                    f"the engine exited with code {engine.returncode} while starting (its error is printed above)"
                )
            if sock.poll(int(SUPERVISE_INTERVAL_S * 1000)):
                reply = codec.decode_engine_message(sock.recv())
                if isinstance(reply, Rejected):
                    raise StartupError(f"engine rejected the handshake: {reply.reason}")
                if isinstance(reply, Welcome):
                    return reply.model
        raise StartupError(f"the engine was not ready within {timeout_s:.0f} s")
    finally:
        sock.close()
        ctx.term()


def stop_process(proc: subprocess.Popen | None, name: str, timeout_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, timeout_s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Supervisor:
    """Owns the two children; restarts a dead engine with backoff; drains on stop."""

    def __init__(self, settings: Settings, address: str, runtime_dir: Path, stop: _StopFlag) -> None:
        self.settings = settings
        self.address = address
        self.drain_flag = runtime_dir / DRAIN_FLAG_NAME
        self.stop = stop
        config = settings.runtime_config(address, drain_flag=str(self.drain_flag), supervisor_pid=os.getpid())
        self.environment = child_environment(config, os.environ)
        self.engine: subprocess.Popen | None = None
        self.web: subprocess.Popen | None = None
        self._engine_started_at = 0.0
        self._restarts = 0  # in a row: reset once an engine stays up
        self._total_restarts = 0

    def start_engine(self) -> ModelInfo:
        command = engine_command(self._total_restarts)
        self.engine = subprocess.Popen(command, env=self.environment, start_new_session=True)
        self._engine_started_at = time.monotonic()
        return wait_for_engine(self.address, self.engine, self.settings.engine_startup_timeout_s, self.stop)

    def start_web(self) -> None:
        self.web = subprocess.Popen(web_command(self.settings), env=self.environment, start_new_session=True)

    def supervise(self) -> int:
        while not self.stop:
            if self.web is not None and self.web.poll() is not None:
                log.error("gunicorn exited with code %s; stopping", self.web.returncode)
                return 1
            if self.engine is not None and self.engine.poll() is not None:
                code = self._restart_engine()
                if code is not None:
                    return code
            elif time.monotonic() - self._engine_started_at > ENGINE_STABLE_S:
                self._restarts = 0  # it ran fine for a while: forget old crashes
            time.sleep(SUPERVISE_INTERVAL_S)
        log.info("received %s; stopping", signal.Signals(self.stop.signum).name)
        return 0

    def _restart_engine(self) -> int | None:
        """Restart a dead engine after a backoff; an exit code when we give up."""
        assert self.engine is not None
        code = self.engine.returncode
        if self._restarts >= self.settings.max_engine_restarts:
            print(
                f"mlx-server: error: the engine exited with code {code}; gave up after "
                f"{self._restarts} restarts (max_engine_restarts)",
                file=sys.stderr,
            )
            return 1
        delay = RESTART_BACKOFF_S[min(self._restarts, len(RESTART_BACKOFF_S) - 1)]
        self._restarts += 1
        self._total_restarts += 1
        log.error(
            "the engine exited with code %s; restart %d of %d in %.0f s",
            code, self._restarts, self.settings.max_engine_restarts, delay,
        )  # fmt: skip
        if self._sleep(delay):
            return None
        try:
            model = self.start_engine()
            log.info("engine restarted: %s", model.model_id)
        except StartupError as exc:
            log.error("engine restart failed: %s", exc)
        return None

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True if a stop came."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop:
            time.sleep(SUPERVISE_INTERVAL_S)
        return bool(self.stop)

    def drain(self) -> None:
        """Refuse new requests (503), let running ones finish up to the drain timeout."""
        if self.web is None or self.web.poll() is not None or self.engine is None:
            return
        self.drain_flag.touch()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        log.info("draining: waiting up to %.0f s for running requests", self.settings.drain_timeout_s)
        while time.monotonic() < deadline and self.engine.poll() is None:
            busy = engine_busy(self.address)
            if busy is None or busy == 0:
                return
            time.sleep(SUPERVISE_INTERVAL_S)
        log.warning("drain timeout: aborting the requests still running")

    def shutdown(self) -> None:
        # gunicorn first: closing its streams aborts their requests in the engine.
        stop_process(self.web, "gunicorn", WEB_STOP_TIMEOUT_S + 5)
        stop_process(self.engine, "engine", ENGINE_STOP_TIMEOUT_S)


def engine_busy(address: str, timeout_s: float = 2.0) -> int | None:
    """Running + queued requests in the engine, or None if it does not answer."""
    ctx = zmq.Context()
    sock = connect_dealer(ctx, address, f"supervisor-probe-{os.getpid()}".encode())
    try:
        sock.send(codec.encode(StatusQuery("drain")))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply = codec.decode_engine_message(sock.recv())
        if isinstance(reply, EngineStatus):
            return reply.running_requests + reply.queued_requests
        return None
    finally:
        sock.close()
        ctx.term()


def run(settings: Settings) -> int:
    configure_logging("mlx-server", settings.log_level, settings.log_format)
    stop = _StopFlag()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    runtime_dir = make_private_runtime_dir()
    address = settings.ipc_address or default_ipc_address(runtime_dir)
    sup = Supervisor(settings, address, runtime_dir, stop)
    try:
        model = sup.start_engine()
        log.info("engine ready: %s (context %d)", model.model_id, model.context_length)
        sup.start_web()
        log.info("serving %s on http://%s:%d/v1", model.model_id, settings.host, settings.port)
        code = sup.supervise()
        if code == 0:
            sup.drain()
        return code
    except StartupError as exc:
        print(f"mlx-server: error: {exc}", file=sys.stderr)
        return 1
    finally:
        sup.shutdown()
        shutil.rmtree(runtime_dir, ignore_errors=True)
