"""GET /health (liveness) and GET /health/ready (the engine answers heartbeats)."""

from __future__ import annotations

import falcon

from frontend.context import AppContext


class LivenessResource:
    """200 while this process serves HTTP at all."""

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadinessResource:
    """200 only while the engine is connected and not draining, else 503."""

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        engine_ok = self._ctx.engine.alive
        draining = self._ctx.drain_gate.draining()
        ready = engine_ok and not draining
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        if not ready:
            resp.set_header("Retry-After", str(self._ctx.settings.retry_after_s))
        resp.media = {
            "status": "ready" if ready else ("draining" if draining else "engine_unavailable"),
            "engine": "up" if engine_ok else "down",
        }
