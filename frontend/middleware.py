"""Per-request bookkeeping: a request id for the logs, HTTP metrics, a debug access line.

``RequestObserver`` goes first in the middleware list, so it also sees the
answers other middleware give (401, 503 while draining). A streamed response
is timed until the WSGI server closes its body, not until its headers.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import falcon

from frontend import metrics
from frontend.engine_client import EngineClient
from ipc.logging_setup import REQUEST_ID

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
# Requests that match no route share one label, so scanners cannot blow up the metric's series.
UNMATCHED_ROUTE = "unmatched"
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def bind_request_id(request_id: str) -> str:
    """Make ``request_id`` the id of this request's log lines (and X-Request-Id); returns it."""
    REQUEST_ID.set(request_id)
    return request_id


class _TimedBody:
    """A response body that reports when the server closes it (end of stream or client gone)."""

    def __init__(self, body: Any, on_close: Callable[[], None]) -> None:
        self._body = body
        self._on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()


class RequestObserver:
    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started_at = time.perf_counter()
        # Generation rebinds it to the response's own id (chatcmpl-…): generation.new_response_id.
        bind_request_id(new_request_id())

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        request_id = REQUEST_ID.get()
        if request_id:
            resp.set_header(REQUEST_ID_HEADER, request_id)
        route = req.uri_template or UNMATCHED_ROUTE
        method = req.method if req.method in KNOWN_METHODS else "other"
        status = resp.status_code
        started = getattr(req.context, "started_at", None) or time.perf_counter()

        def done() -> None:
            elapsed = time.perf_counter() - started
            metrics.observe_http(route, method, status, elapsed)
            log.debug("%s %s %d %.3f s", req.method, req.path, status, elapsed)
            REQUEST_ID.set(None)

        if resp.stream is not None:
            resp.stream = _TimedBody(resp.stream, done)
        else:
            done()


class ArrivalNotice:
    """Tells the engine that a generation request began before its handler reads
    the body (``EngineClient.announce``), and settles the announcement when the
    handler returns, whatever happened; a request that submitted settled then.

    A worker forwards a burst only when it has parsed all of it, and several
    workers do so at different moments: told that requests are on their way, an
    engine prefills the burst whole instead of in parts. Generation routes are
    the ones whose operation streams."""

    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: object) -> None:
        operation = getattr(resource, "openapi", {}).get(req.method.lower())
        if operation is not None and operation.stream is not None:
            self._engine.announce()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        self._engine.settle()
