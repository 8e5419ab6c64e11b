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
from pathlib import Path
from typing import Optional

import zmq

from deploy.settings import Settings
from ipc import codec
from ipc.messages import PROTOCOL_VERSION, Hello, ModelInfo, Rejected, Welcome
from ipc.sockets import ENV_IPC_ADDRESS, connect_dealer, default_ipc_address, make_private_runtime_dir

log = logging.getLogger("mlx-server")

SUPERVISE_INTERVAL_S = 0.2
ENGINE_STOP_TIMEOUT_S = 10.0
# gunicorn's graceful stop lets in-flight requests finish for this long.
WEB_STOP_TIMEOUT_S = 30.0
ENV_SUPERVISOR_PID = "MLX_SERVER_SUPERVISOR_PID"


class StartupError(Exception):
    """Startup failed; the message is one line for the user."""


class _StopFlag:
    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __call__(self, signum: int, _frame: object) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


def engine_command(settings: Settings, address: str) -> list[str]:
    cmd = [
        sys.executable, "-m", "engine",
        "--model-path", str(settings.model_path),
        "--ipc-address", address,
        "--log-level", settings.log_level,
        "--max-batch-size", str(settings.max_batch_size),
        "--prefill-batch-size", str(settings.prefill_batch_size),
        "--prefill-step-size", str(settings.prefill_step_size),
        "--prompt-cache-bytes", str(settings.prompt_cache_bytes),
    ]  # fmt: skip
    if settings.adapter_path:
        cmd += ["--adapter-path", str(settings.adapter_path)]
    return cmd


def web_command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn",
        "--config", "python:frontend.gunicorn_conf",
        "--bind", f"{settings.host}:{settings.port}",
        "--workers", str(settings.workers),
        "--threads", str(settings.threads),
        "--log-level", settings.log_level,
        "--graceful-timeout", str(int(WEB_STOP_TIMEOUT_S)),
        # gunicorn's control socket sits at one fixed path per user: several
        # instances on one machine would fight over it, and we don't use it.
        "--no-control-socket",
        "frontend.wsgi:build_app()",
    ]  # fmt: skip


def web_environment(settings: Settings, address: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            ENV_IPC_ADDRESS: address,
            ENV_SUPERVISOR_PID: str(os.getpid()),
            "MLX_SERVER_DEFAULT_MAX_TOKENS": str(settings.default_max_tokens),
            "MLX_SERVER_REQUEST_TIMEOUT_S": str(settings.request_timeout_s),
            # The frontend uses transformers for tokenizers only; its "PyTorch
            # was not found" advisory is noise for every worker.
            "TRANSFORMERS_VERBOSITY": "error",
        }
    )
    return env


def wait_for_engine(
    address: str, engine: subprocess.Popen, timeout_s: float, stop: _StopFlag
) -> ModelInfo:
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
                    f"the engine exited with code {engine.returncode} while starting "
                    "(its error is printed above)"
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


def stop_process(proc: Optional[subprocess.Popen], name: str, timeout_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, timeout_s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _supervise(engine: subprocess.Popen, web: subprocess.Popen, stop: _StopFlag) -> int:
    while not stop:
        if engine.poll() is not None:
            log.error("the engine exited with code %s; stopping", engine.returncode)
            return 1
        if web.poll() is not None:
            log.error("gunicorn exited with code %s; stopping", web.returncode)
            return 1
        time.sleep(SUPERVISE_INTERVAL_S)
    log.info("received %s; stopping", signal.Signals(stop.signum).name)
    return 0


def run(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s mlx-server %(levelname)s: %(message)s",
    )
    stop = _StopFlag()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    runtime_dir: Optional[Path] = None
    address = settings.ipc_address
    if not address:
        runtime_dir = make_private_runtime_dir()
        address = default_ipc_address(runtime_dir)
    engine: Optional[subprocess.Popen] = None
    web: Optional[subprocess.Popen] = None
    try:
        engine = subprocess.Popen(engine_command(settings, address), start_new_session=True)
        model = wait_for_engine(address, engine, settings.engine_startup_timeout_s, stop)
        log.info("engine ready: %s (context %d)", model.model_id, model.context_length)
        web = subprocess.Popen(
            web_command(settings), env=web_environment(settings, address), start_new_session=True
        )
        log.info("serving %s on http://%s:%d/v1", model.model_id, settings.host, settings.port)
        return _supervise(engine, web, stop)
    except StartupError as exc:
        print(f"mlx-server: error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_process(web, "gunicorn", WEB_STOP_TIMEOUT_S + 5)
        stop_process(engine, "engine", ENGINE_STOP_TIMEOUT_S)
        if runtime_dir is not None:
            shutil.rmtree(runtime_dir, ignore_errors=True)
