"""GET /openapi.json: the OpenAPI 3.1 document of this server (built once, from the models)."""

from __future__ import annotations

import falcon
import msgspec

from frontend.context import AppContext
from frontend.openapi import Operation, openapi_document


class OpenAPIResource:
    openapi = {"get": Operation("This document (OpenAPI 3.1)")}

    def __init__(self, ctx: AppContext) -> None:
        self._body = msgspec.json.encode(openapi_document())

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body
