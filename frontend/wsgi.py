"""The WSGI app gunicorn serves: ``gunicorn 'frontend.wsgi:build_app()'``.

gunicorn calls build_app() in each worker after the fork, so the ZeroMQ
context, the I/O thread and the tokenizer belong to that worker alone.
Everything configurable comes from the config mlx-server (or deploy.procfile)
put in the environment (ipc.runtime).
"""

from __future__ import annotations

import logging
import os

import falcon

from frontend.app import create_app
from frontend.context import FrontendSettings
from frontend.tokenization import Tokenization
from frontend.zmq_client import ZmqEngineClient
from ipc import runtime

log = logging.getLogger(__name__)

# How long a booting worker waits for the engine's handshake before it boots
# anyway (the tokenizer loads from the model path without it) and answers 503
# until the engine is ready: under a Procfile the engine may still be loading.
ENGINE_WAIT_S = 5.0


def frontend_settings(web: runtime.WebConfig) -> FrontendSettings:
    return FrontendSettings(
        default_max_tokens=web.default_max_tokens,
        api_keys=web.api_keys,
        cors_origins=web.cors_origins,
        ui=web.ui,
        drain_flag=web.drain_flag,
    )


def build_app() -> falcon.App:
    config = runtime.from_environ(os.environ)
    client = ZmqEngineClient(
        config.ipc_address,
        request_timeout_s=config.web.request_timeout_s,
        max_queued_requests=config.web.max_queued_requests,
    )
    if not client.wait_ready(ENGINE_WAIT_S):
        log.warning("engine not ready yet: answering 503 until it is")
    settings = frontend_settings(config.web)
    tokenization = Tokenization.from_pretrained(config.model_path, skip_special_tokens=settings.skip_special_tokens)
    return create_app(client, tokenization, settings=settings)
