"""gunicorn settings for the frontend (bind, workers and connections come from the CLI).

Workers are gevent's: one greenlet per connection, all in one OS thread. A
stream's tokens then reach its socket without a thread hand-off: with threads
(gthread), every token woke its request's thread (a futex, the GIL changing
hands), CPU that a small machine takes from the engine (figures: BENCHMARKS.md,
"Measurements behind the defaults"). The per-request work (validation, chat
template, tokenizing) is pure CPU and holds the worker's other streams while
it runs; it held the GIL under threads too.

Logs: every gunicorn and app line goes through ipc.logging_setup, as text or
JSON (the config's log_format, ipc.runtime). Metrics: the master creates a private
PROMETHEUS_MULTIPROC_DIR before it forks any worker (so all workers count in
one /metrics), marks dead workers' files and removes the directory on exit.
"""

from __future__ import annotations

import gc
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

from gunicorn.glogging import Logger

from ipc import runtime
from ipc.logging_setup import dict_config

ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
LOG_ROLE = "web"

worker_class = "gevent"
# Workers import the app after the fork: ZeroMQ contexts must never be
# created in the master (DESIGN.md) and the tokenizer loads once per worker.
preload_app = False
# On Linux each worker listens on a socket of its own (SO_REUSEPORT) and the
# kernel spreads new connections evenly over them. On one shared socket the
# workers that happen to be awake take most: 64 connections over 4 workers
# landed 33 / 15 / 14 / 2, and a burst on them was parsed by two workers
# (BENCHMARKS.md, "Measurements behind the defaults"). macOS's SO_REUSEPORT
# does not balance, so there the workers keep sharing one. The supervisor
# checks the port is free first (deploy.supervisor.port_problem): two
# instances must never share a port.
reuse_port = sys.platform == "linux"
# Workers heartbeat from their own greenlet, so long streams are fine.
timeout = 60
keepalive = 5
# One log line per request only at debug level (access logs can leak prompts' URLs, not bodies).
accesslog = None


class NoAccessLogger(Logger):
    """gunicorn's logger with its access log off for good. A logconfig turns that log
    on (ipc.logging_setup then silences it), and gunicorn built its atoms, a dict of
    every header and environ entry, for every request all the same: about 3 % of a
    worker's CPU under load, taken from the engine on a small machine."""

    def access(self, resp: object, req: object, environ: object, request_time: object) -> None:
        return None


logger_class = NoAccessLogger

# mlx-server and deploy.procfile always hand a config; only tests import these hooks without one.
_config = runtime.from_environ(os.environ) if os.environ.get(runtime.CONFIG_ENV) else None
logconfig_dict = dict_config(LOG_ROLE, _config.log_format) if _config else {}

PARENT_CHECK_INTERVAL_S = 1.0
# The metrics directory this master created (None: the user's own, left in place).
_own_metrics_dir: str | None = None


def _exit_when_supervisor_dies(server) -> None:
    supervisor_pid = _config.web.supervisor_pid if _config else None
    if supervisor_pid is None:  # a Procfile runner: it watches gunicorn itself
        return

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(PARENT_CHECK_INTERVAL_S)
        server.log.warning("mlx-server supervisor is gone; shutting down")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _prepare_metrics_dir() -> None:
    """Before any worker forks: workers inherit the variable and prometheus-client
    picks multiprocess mode when they import it."""
    global _own_metrics_dir
    path = os.environ.get(ENV_MULTIPROC_DIR)
    if path:
        # A directory the operator chose: counters of a previous run must not leak in.
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
        return
    _own_metrics_dir = tempfile.mkdtemp(prefix="mlx-server-metrics-")  # 0700: private to this user
    os.environ[ENV_MULTIPROC_DIR] = _own_metrics_dir


def on_starting(server) -> None:
    # gunicorn sets only its own loggers' level from --log-level; the app's follow it.
    logging.getLogger().setLevel(server.log.loglevel)
    _prepare_metrics_dir()


def when_ready(server) -> None:
    _exit_when_supervisor_dies(server)


def post_worker_init(worker) -> None:
    # The app and its tokenizer are loaded: exclude them from garbage collection,
    # so full collections (triggered by per-token allocations) walk only what
    # requests create, not the whole start-up heap, between two SSE writes.
    gc.collect()
    gc.freeze()


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess  # after on_starting set the directory

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    global _own_metrics_dir
    if _own_metrics_dir is not None:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
        if os.environ.get(ENV_MULTIPROC_DIR) == _own_metrics_dir:
            del os.environ[ENV_MULTIPROC_DIR]
        _own_metrics_dir = None
