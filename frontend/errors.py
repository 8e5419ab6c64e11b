"""OpenAI-style errors: one JSON shape for every failure, never a traceback.

Two families (DESIGN rule 4): client errors (4xx, ``invalid_request_error``)
and server errors (5xx, ``server_error``; 503 when the engine is unavailable).
Falcon's own errors (unknown route, wrong method, unreadable body) are mapped
to the same shape by ``install_error_handlers``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import falcon

from frontend.engine_client import ClientDisconnected, EngineOverloaded, EngineUnavailable, RequestTimedOut
from frontend.shapes import Shape

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
NOT_FOUND = "not_found_error"
# Longest engine error text passed on to a client.
ENGINE_ERROR_CHARS = 200


class ErrorDetail(Shape):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Shape):
    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))


class APIError(Exception):
    """An error that reaches the client as OpenAI error JSON with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or (INVALID_REQUEST if status < 500 else SERVER_ERROR)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> ErrorResponse:
        return error_body(self.message, self.type, self.param, self.code)


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def generation_failed(detail: str | None) -> APIError:
    """The engine reported an error for one request (finish_reason "error").

    The client gets one line of it: whatever the engine attaches beyond
    that (a parser state, a grammar) is for the log only.
    """
    summary = (detail or "").strip().split("\n", 1)[0][:ENGINE_ERROR_CHARS] or "unknown error"
    if summary != (detail or "").strip():
        log.error("engine error in full: %s", detail)
    return APIError(500, f"generation failed in the engine: {summary}", code="engine_error")


def request_too_large(detail: str) -> APIError:
    """The engine refused a request that no load would let it run (finish_reason
    "too_large": past the context length, or more KV cache than its whole budget):
    the client's to shorten, so a 400 that passes on the engine's numbers."""
    return invalid_request(detail, code="request_too_large")


def engine_unavailable(exc: BaseException, headers: Mapping[str, str] | None = None) -> APIError:
    message = f"the engine is unavailable: {exc}" if str(exc) else "the engine is unavailable"
    return APIError(503, message, code="engine_unavailable", headers=headers)


def internal_error() -> APIError:
    return APIError(500, "internal server error", code="internal_error")


def _write(resp: falcon.Response, status: int, body: ErrorResponse, headers: Mapping[str, str] | None = None) -> None:
    # Replace whatever a half-run responder set. A streamed body that will
    # never be sent must still be closed: closing it aborts its engine requests.
    close = getattr(resp.stream, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("closing an abandoned response body failed")
    resp.stream = None
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = body.dump()
    for name, value in (headers or {}).items():
        resp.set_header(name, value)


# Falcon's built-in errors, by status: what the client is told.
_FALCON_MESSAGES = {
    404: lambda req, ex: f"Invalid URL ({req.method} {req.path})",
    405: lambda req, ex: f"Method {req.method} is not allowed for {req.path}",
}
_FALCON_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _falcon_message(req: falcon.Request, ex: falcon.HTTPError) -> str:
    describe = _FALCON_MESSAGES.get(ex.status_code)
    if describe is not None:
        return describe(req, ex)
    parts = [p for p in (ex.title, ex.description) if p]
    return ": ".join(parts) or "invalid request"


def install_error_handlers(app: falcon.App, *, retry_after_s: int) -> None:
    """Route every exception to OpenAI error JSON (most specific class wins)."""

    def on_api_error(req: falcon.Request, resp: falcon.Response, ex: APIError, params: dict) -> None:
        if ex.status >= 500:
            log.error("%s %s failed: %s", req.method, req.path, ex.message)
        _write(resp, ex.status, ex.body(), ex.headers)

    def on_engine_unavailable(req: falcon.Request, resp: falcon.Response, ex: EngineUnavailable, params: dict) -> None:
        log.warning("%s %s: engine unavailable: %s", req.method, req.path, ex)
        _write(resp, 503, engine_unavailable(ex).body(), {"Retry-After": str(retry_after_s)})

    def on_overloaded(req: falcon.Request, resp: falcon.Response, ex: EngineOverloaded, params: dict) -> None:
        log.warning("%s %s: %s", req.method, req.path, ex)
        body = error_body(f"the server is busy: {ex}", "rate_limit_error", None, "rate_limit_exceeded")
        _write(resp, 429, body, {"Retry-After": str(retry_after_s)})

    def on_client_gone(req: falcon.Request, resp: falcon.Response, ex: ClientDisconnected, params: dict) -> None:
        log.info("%s %s: %s", req.method, req.path, ex)
        # Nobody reads this answer; nginx's 499 has no standard code, 400 it is.
        _write(resp, 400, error_body(str(ex), INVALID_REQUEST, None, "client_disconnected"))

    def on_timeout(req: falcon.Request, resp: falcon.Response, ex: RequestTimedOut, params: dict) -> None:
        log.warning("%s %s: %s", req.method, req.path, ex)
        _write(resp, 504, error_body(str(ex), SERVER_ERROR, None, "timeout"))

    def on_falcon_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: dict) -> None:
        status = ex.status_code
        type_ = INVALID_REQUEST if status < 500 else SERVER_ERROR
        body = error_body(_falcon_message(req, ex), type_, None, _FALCON_CODES.get(status))
        _write(resp, status, body, dict(ex.headers or {}))

    def on_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
        # The traceback goes to the log, never to the client.
        log.exception("%s %s: unexpected error", req.method, req.path)
        _write(resp, 500, internal_error().body())

    app.add_error_handler(Exception, on_unexpected)
    app.add_error_handler(falcon.HTTPError, on_falcon_error)
    app.add_error_handler(EngineUnavailable, on_engine_unavailable)
    app.add_error_handler(RequestTimedOut, on_timeout)
    app.add_error_handler(EngineOverloaded, on_overloaded)
    app.add_error_handler(ClientDisconnected, on_client_gone)
    app.add_error_handler(APIError, on_api_error)
