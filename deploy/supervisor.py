"""The mlx-server supervisor: engine first, then gunicorn, then watch both.

Signal handlers only record; the loop acts. Children run in their own
sessions so a terminal's Ctrl-C reaches only us, and we stop them in order:
gunicorn first (it drains in-flight HTTP requests), then the engine. A
sharded engine is a group of ranks under mlx.launch (deploy/engine_group.py),
watched, restarted and stopped as one engine.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import zmq

from deploy import shardable
from deploy.engine_group import EngineGroup
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
# As mlx-server's settings errors: a model that cannot be sharded so is a misconfiguration.
EXIT_USAGE = 2


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


def port_problem(host: str, port: int) -> str | None:
    """Why the HTTP port cannot be bound, checked before anything starts; None when it can.

    The web workers bind it with SO_REUSEPORT on Linux (frontend.gunicorn_conf), which a
    second instance doing the same would join, taking half the first one's connections:
    this probe, without SO_REUSEPORT, fails on any socket already listening there. It also
    makes a taken port one line and exit 2 instead of a model load and gunicorn's retries.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        return f"cannot bind {host}:{port}: {exc.strerror}"
    with socket.socket(family, kind, proto) as probe:
        # As gunicorn's own listener: a closed connection's TIME_WAIT does not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (another server or mlx-server instance): choose another --port"
            return f"cannot bind {host}:{port}: {exc.strerror}"
    return None


def child_environment(config: runtime.RuntimeConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the engine and of gunicorn: ours plus the config, encoded once."""
    return {
        **environ,
        runtime.CONFIG_ENV: runtime.encode(config),
        # The frontend uses transformers for tokenizers only; its "PyTorch
        # was not found" advisory is noise for every worker.
        "TRANSFORMERS_VERBOSITY": "error",
    }


def wait_for_engine(
    address: str, engine: subprocess.Popen, timeout_s: float, stop: _StopFlag, *, group: bool = False
) -> ModelInfo:
    """Handshake with the engine (rank 0 of a group); fail fast if it exits or we are told to stop."""
    ctx = zmq.Context()
    sock = connect_dealer(ctx, address, f"supervisor-{os.getpid()}".encode())
    try:
        sock.send(codec.encode(Hello("supervisor", PROTOCOL_VERSION)))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop:
                raise StartupError("stopped by signal during startup")
            if engine.poll() is not None and group:
                # mlx.launch's own exit code says nothing about its ranks'.
                raise StartupError("the engine group exited while starting (a rank's error is printed above)")
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
        # A sharded engine: mlx.launch's process stands for the group in self.engine.
        self.group = None if config.distributed is None else EngineGroup(config, self.environment)
        self.engine: subprocess.Popen | None = None
        self.web: subprocess.Popen | None = None
        self._engine_started_at = 0.0
        self._restarts = 0  # in a row: reset once an engine stays up
        self._total_restarts = 0

    def start_engine(self) -> ModelInfo:
        if self.group is None:
            command = engine_command(self._total_restarts)
            self.engine = subprocess.Popen(command, env=self.environment, start_new_session=True)
            self._engine_started_at = time.monotonic()
            return wait_for_engine(self.address, self.engine, self.settings.engine_startup_timeout_s, self.stop)
        try:
            self.engine = self.group.start(self._total_restarts)
        except OSError as exc:  # no mlx.launch, no free ports
            raise StartupError(f"cannot start the engine group: {exc}") from None
        self._engine_started_at = time.monotonic()
        try:
            timeout_s = self.settings.engine_startup_timeout_s
            model = wait_for_engine(self.address, self.engine, timeout_s, self.stop, group=True)
        except StartupError:
            self.group.kill()  # ranks that loaded must not wait for a rank 0 that never will
            raise
        self.group.watch()
        return model

    def engine_gone(self) -> str | None:
        """Why the engine (or its group, then killed whole) is gone; None while it runs."""
        if self.engine is None:
            return None
        if self.group is not None:
            return self.group.dead()
        if self.engine.poll() is not None:
            return f"the engine exited with code {self.engine.returncode}"
        return None

    def start_web(self) -> None:
        self.web = subprocess.Popen(web_command(self.settings), env=self.environment, start_new_session=True)

    def supervise(self) -> int:
        while not self.stop:
            if self.web is not None and self.web.poll() is not None:
                log.error("gunicorn exited with code %s; stopping", self.web.returncode)
                return 1
            gone = self.engine_gone()
            if gone is not None:
                code = self._restart_engine(gone)
                if code is not None:
                    return code
            elif time.monotonic() - self._engine_started_at > ENGINE_STABLE_S:
                self._restarts = 0  # it ran fine for a while: forget old crashes
            time.sleep(SUPERVISE_INTERVAL_S)
        log.info("received %s; stopping", signal.Signals(self.stop.signum).name)
        return 0

    def _restart_engine(self, gone: str) -> int | None:
        """Restart a dead engine after a backoff; an exit code when we give up."""
        if self._restarts >= self.settings.max_engine_restarts:
            print(
                f"mlx-server: error: {gone}; gave up after {self._restarts} restarts (max_engine_restarts)",
                file=sys.stderr,
            )
            return 1
        delay = RESTART_BACKOFF_S[min(self._restarts, len(RESTART_BACKOFF_S) - 1)]
        self._restarts += 1
        self._total_restarts += 1
        log.error(
            "%s; restart %d of %d in %.0f s",
            gone, self._restarts, self.settings.max_engine_restarts, delay,
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
        if self.group is not None:
            self.group.stop(ENGINE_STOP_TIMEOUT_S)
        else:
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


def sharding_problem(settings: Settings) -> str | None:
    """The engine's own check that the model can be sharded as asked, before any rank starts
    (a subprocess: deploy never imports mlx); None for one engine process or when it can."""
    group = settings.distributed()
    if group is None:
        return None
    adapter = None if settings.adapter_path is None else str(settings.adapter_path)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    return shardable.engine_problem(str(settings.model_path), group.mode, group.ranks, adapter, group.backend, env)


def run(settings: Settings) -> int:
    configure_logging("mlx-server", settings.log_level, settings.log_format)
    stop = _StopFlag()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    problem = port_problem(settings.host, settings.port) or sharding_problem(settings)
    if problem is not None:
        print(f"mlx-server: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
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
