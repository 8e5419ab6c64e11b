"""gunicorn settings for the frontend (bind, workers and threads come from the CLI).

Workers are threaded (gthread): each streaming response holds one thread, and
the threads spend their time waiting on the engine, not on the GIL.
"""

from __future__ import annotations

import os
import signal
import threading
import time

worker_class = "gthread"
# Workers import the app after the fork: ZeroMQ contexts must never be
# created in the master (DESIGN.md) and the tokenizer loads once per worker.
preload_app = False
# gthread workers heartbeat from their main loop, so long streams are fine.
timeout = 60
keepalive = 5
# One log line per request only at debug level (access logs can leak prompts' URLs, not bodies).
accesslog = None

PARENT_CHECK_INTERVAL_S = 1.0


def _exit_when_supervisor_dies(server) -> None:
    supervisor_pid = int(os.environ.get("MLX_SERVER_SUPERVISOR_PID", "0"))
    if not supervisor_pid:
        return

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(PARENT_CHECK_INTERVAL_S)
        server.log.warning("mlx-server supervisor is gone; shutting down")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def when_ready(server) -> None:
    _exit_when_supervisor_dies(server)
