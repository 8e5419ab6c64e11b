"""GET /v1/models: the one model this server was started with."""

from __future__ import annotations

import falcon

from frontend.context import AppContext
from frontend.openai_shapes import OWNED_BY, ModelCard, ModelList
from frontend.openapi import Operation


class ModelsResource:
    openapi = {"get": Operation("The one loaded model", response=ModelList, errors=(401,))}

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        model = self._ctx.engine.model
        card = ModelCard(
            id=model.model_id,
            object="model",
            created=model.created,
            owned_by=OWNED_BY,
            context_length=model.context_length,
            max_model_len=model.context_length,
            adapter=model.adapter_path,
            path=model.model_path,
        )
        resp.content_type = falcon.MEDIA_JSON
        resp.data = ModelList(object="list", data=[card]).dump()
