"""The WSGI app gunicorn serves: ``gunicorn 'frontend.wsgi:build_app()'``.

gunicorn calls build_app() in each worker after the fork, so the ZeroMQ
context, the I/O thread and the tokenizer belong to that worker alone.
"""

from __future__ import annotations

import logging
import os

import falcon

from frontend.app import create_app
from frontend.context import FrontendSettings
from frontend.zmq_client import ZmqEngineClient
from ipc.sockets import ENV_IPC_ADDRESS

log = logging.getLogger(__name__)

# The supervisor passes these; defaults match deploy.settings for a bare gunicorn run.
ENV_DEFAULT_MAX_TOKENS = "MLX_SERVER_DEFAULT_MAX_TOKENS"
ENV_REQUEST_TIMEOUT_S = "MLX_SERVER_REQUEST_TIMEOUT_S"
ENV_ENGINE_WAIT_S = "MLX_SERVER_ENGINE_WAIT_S"


def build_app() -> falcon.App:
    address = os.environ.get(ENV_IPC_ADDRESS)
    if not address:
        raise RuntimeError(f"{ENV_IPC_ADDRESS} is not set: start the frontend with mlx-server")
    client = ZmqEngineClient(
        address,
        request_timeout_s=float(os.environ.get(ENV_REQUEST_TIMEOUT_S, "600")),
        handshake_timeout_s=float(os.environ.get(ENV_ENGINE_WAIT_S, "30")),
    )
    settings = FrontendSettings(default_max_tokens=int(os.environ.get(ENV_DEFAULT_MAX_TOKENS, "4096")))
    log.info("worker %d serving %s", os.getpid(), client.model.model_id)
    return create_app(client, settings=settings)
