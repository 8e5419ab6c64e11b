"""GET /health (liveness) and GET /health/ready (the engine answers heartbeats)."""

from __future__ import annotations

from typing import Literal

import falcon

from frontend.context import AppContext
from frontend.openapi import Operation
from frontend.shapes import Shape


class Liveness(Shape):
    status: Literal["ok"]


class Readiness(Shape):
    status: Literal["ready", "draining", "engine_unavailable"]
    engine: Literal["up", "down"]


class LivenessResource:
    """200 while this process serves HTTP at all."""

    openapi = {"get": Operation("Liveness: this process serves HTTP", response=Liveness)}

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = Liveness(status="ok").dump()


class ReadinessResource:
    """200 only while the engine is connected and not draining, else 503."""

    # The 503 body is a Readiness too (not an error): probes read its status.
    openapi = {
        "get": Operation(
            "Readiness: the engine answers and the server is not draining", response=Readiness, same_body=(503,)
        )
    }

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        engine_ok = self._ctx.engine.alive
        draining = self._ctx.drain_gate.draining()
        ready = engine_ok and not draining
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        if not ready:
            resp.set_header("Retry-After", str(self._ctx.settings.retry_after_s))
        body = Readiness(
            status="ready" if ready else ("draining" if draining else "engine_unavailable"),
            engine="up" if engine_ok else "down",
        )
        resp.content_type = falcon.MEDIA_JSON
        resp.data = body.dump()
