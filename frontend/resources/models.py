"""GET /v1/models: the one model this server was started with."""

from __future__ import annotations

import falcon

from frontend import protocol
from frontend.context import AppContext


class ModelsResource:
    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        model = self._ctx.engine.model
        card = protocol.model_card(
            model.model_id, model.created, model.context_length, model.adapter_path, model.model_path
        )
        resp.media = {"object": "list", "data": [card]}
