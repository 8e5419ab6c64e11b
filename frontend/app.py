"""The Falcon WSGI application: routes, error handlers, shared context.

``create_app(engine)`` is all a WSGI server needs; the engine client is
injected (DESIGN rule 7), so unit tests pass a fake and gunicorn workers the
ZeroMQ client.
"""

from __future__ import annotations

import logging

import falcon
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from frontend.context import AppContext, FrontendSettings
from frontend.engine_client import EngineClient
from frontend.errors import install_error_handlers
from frontend.guards import ApiKeyGate
from frontend.metrics import MetricsResource
from frontend.middleware import ArrivalNotice, RequestObserver
from frontend.resources.chat import ChatCompletionsResource
from frontend.resources.completions import CompletionsResource
from frontend.resources.health import LivenessResource, ReadinessResource
from frontend.resources.messages import AnthropicErrors, CountTokensResource, MessagesResource
from frontend.resources.models import ModelsResource
from frontend.resources.openapi import OpenAPIResource
from frontend.resources.removed import ModelManagementResource, RetrieveModelResource
from frontend.resources.responses import ResponsesResource
from frontend.resources.status import StatusResource
from frontend.resources.tokenize import DetokenizeResource, TokenizeResource
from frontend.resources.ui import AssetResource, PageResource, UiRedirectResource
from frontend.tokenization import Tokenization

__all__ = ["FrontendSettings", "ROUTES", "create_app"]

log = logging.getLogger(__name__)

# URI template -> resource class (built with the AppContext; its ``openapi``
# operations make /openapi.json). Falcon answers 404/405 for anything else
# (turned into OpenAI error JSON by the error handlers).
ROUTES: dict[str, type] = {
    "/v1/chat/completions": ChatCompletionsResource,
    "/v1/completions": CompletionsResource,
    "/v1/messages": MessagesResource,
    "/v1/messages/count_tokens": CountTokensResource,
    "/v1/responses": ResponsesResource,
    "/v1/models": ModelsResource,
    "/v1/mlx/status": StatusResource,
    "/tokenize": TokenizeResource,  # vLLM serves these two at the root
    "/detokenize": DetokenizeResource,
    "/openapi.json": OpenAPIResource,
    "/health": LivenessResource,
    "/health/ready": ReadinessResource,
    "/metrics": MetricsResource,
    "/": PageResource,
    "/ui": UiRedirectResource,  # /ui/ too (trailing slashes are stripped)
    "/ui/{name}": AssetResource,
    # Removed in 0.2: 410 Gone with what to do instead.
    "/v1/models/{model_id:path}": RetrieveModelResource,
    "/v1/mlx/models/{rest:path}": ModelManagementResource,
}


def _tokenization(
    engine: EngineClient,
    tokenizer: Tokenization | PreTrainedTokenizerBase | None,
    settings: FrontendSettings,
) -> Tokenization:
    if isinstance(tokenizer, Tokenization):
        return tokenizer
    if tokenizer is not None:
        return Tokenization(tokenizer, skip_special_tokens=settings.skip_special_tokens)
    # The model path the engine announced in its handshake.
    return Tokenization.from_pretrained(engine.model.model_path, skip_special_tokens=settings.skip_special_tokens)


def create_app(
    engine: EngineClient,
    tokenizer: Tokenization | PreTrainedTokenizerBase | None = None,
    *,
    settings: FrontendSettings,
) -> falcon.App:
    """A WSGI app serving ``engine``'s model.

    ``tokenizer``: a ``Tokenization``, a transformers tokenizer, or None to
    load it from ``engine.model.model_path``.
    """
    ctx = AppContext(engine=engine, tokenization=_tokenization(engine, tokenizer, settings), settings=settings)
    middleware: list[object] = [ctx.drain_gate, ArrivalNotice(engine)]
    if settings.api_keys:
        middleware.insert(0, ApiKeyGate(settings.api_keys))
    if settings.cors_origins:
        middleware.insert(0, falcon.CORSMiddleware(allow_origins=list(settings.cors_origins)))
    middleware.insert(0, AnthropicErrors())  # reshapes every error on the Messages routes, gates' too
    middleware.insert(0, RequestObserver())  # first: it times and counts every answer, gates' too
    app = falcon.App(media_type=falcon.MEDIA_JSON, middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    install_error_handlers(app, retry_after_s=settings.retry_after_s)
    for uri_template, resource in ROUTES.items():
        app.add_route(uri_template, resource(ctx))
    log.info("frontend worker ready")
    return app
