"""The WSGI app gunicorn serves: ``gunicorn 'frontend.wsgi:build_app()'``.

gunicorn calls build_app() in each worker after the fork, so the ZeroMQ
context, the I/O thread and the tokenizer belong to that worker alone.
"""

from __future__ import annotations

import logging
import os

import falcon

from frontend import environment as env
from frontend.app import create_app
from frontend.context import FrontendSettings
from frontend.tokenization import Tokenization
from frontend.zmq_client import ZmqEngineClient

log = logging.getLogger(__name__)

# How long a booting worker waits for the engine's handshake when it can load
# the tokenizer without it (MLX_SERVER_MODEL_PATH set): then it boots anyway
# and answers 503 until the engine is ready. Without the path it must wait.
ENGINE_WAIT_S = 5.0
ENGINE_WAIT_NO_PATH_S = 600.0


def settings_from_environment() -> FrontendSettings:
    """What the supervisor (or a Procfile's environment) configured; defaults match deploy.settings."""
    get = os.environ.get
    return FrontendSettings(
        default_max_tokens=int(get(env.DEFAULT_MAX_TOKENS, "4096")),
        api_keys=tuple(k.strip() for k in get(env.API_KEYS, "").splitlines() if k.strip()),
        cors_origins=tuple(o.strip() for o in get(env.CORS_ORIGINS, "").split(",") if o.strip()),
        drain_flag=get(env.DRAIN_FLAG) or None,
    )


def build_app() -> falcon.App:
    address = os.environ.get(env.IPC_ADDRESS)
    if not address:
        raise RuntimeError(f"{env.IPC_ADDRESS} is not set: start the frontend with mlx-server")
    client = ZmqEngineClient(
        address,
        request_timeout_s=float(os.environ.get(env.REQUEST_TIMEOUT_S, "600")),
        max_queued_requests=int(os.environ.get(env.MAX_QUEUED_REQUESTS, "256")),
    )
    settings = settings_from_environment()
    model_path = os.environ.get(env.MODEL_PATH)
    if client.wait_ready(ENGINE_WAIT_S if model_path else ENGINE_WAIT_NO_PATH_S):
        model_path = client.model.model_path
    elif model_path:
        log.warning("engine not ready yet: answering 503 until it is")
    else:
        raise RuntimeError(f"no handshake from the engine at {address}")
    tokenization = Tokenization.from_pretrained(model_path, skip_special_tokens=settings.skip_special_tokens)
    return create_app(client, tokenization, settings=settings)
