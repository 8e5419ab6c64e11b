"""The 0.1 model-management endpoints, gone in 0.2: 410 with what to do instead.

0.2 serves one model, fixed at startup; several models are several
mlx-server instances (one per port) behind a proxy.
"""

from __future__ import annotations

import falcon

from frontend.context import AppContext
from frontend.errors import APIError
from frontend.openapi import Operation

_ONE_MODEL = "mlx-server 0.2 serves one model, fixed at startup."
_ANOTHER_INSTANCE = (
    "To serve another model, start another mlx-server instance with that model path on another port "
    "(`mlx-server /path/to/model --port 8081`) and route to it with a proxy."
)
_LIST = "GET /v1/models lists the model this instance serves."

# (method, action) -> what the client is told.
_MESSAGES = {
    ("POST", "load"): f"POST /v1/mlx/models/load was removed. {_ONE_MODEL} {_ANOTHER_INSTANCE}",
    ("DELETE", "unload"): (
        f"DELETE /v1/mlx/models/{{id}} was removed. {_ONE_MODEL} Stop the instance to unload its model."
    ),
    ("POST", "reload"): (
        f"POST /v1/mlx/models/{{id}}/reload was removed. {_ONE_MODEL} "
        "Restart the instance (or let its supervisor restart the engine) to reload it."
    ),
    ("GET", "retrieve"): f"GET /v1/models/{{id}} was removed. {_ONE_MODEL} {_LIST}",
}


def gone(method: str, action: str) -> APIError:
    return APIError(410, _MESSAGES[(method, action)], code="endpoint_removed")


class RetrieveModelResource:
    """GET /v1/models/{model_id} (any id, slashes included)."""

    openapi = {"get": Operation("Removed: retrieve a model (GET /v1/models lists it)", removed=True)}

    def __init__(self, ctx: AppContext) -> None:
        pass

    def on_get(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        raise gone("GET", "retrieve")


class ModelManagementResource:
    """/v1/mlx/models/{rest}: load, DELETE {id}, {id}/reload (ids may hold slashes)."""

    openapi = {
        "post": Operation("Removed: load or reload a model (one model per instance)", removed=True, errors=(404,)),
        "delete": Operation("Removed: unload a model (stop the instance instead)", removed=True),
    }

    def __init__(self, ctx: AppContext) -> None:
        pass

    def on_post(self, req: falcon.Request, resp: falcon.Response, rest: str) -> None:
        if rest == "load":
            raise gone("POST", "load")
        if rest.endswith("/reload"):
            raise gone("POST", "reload")
        raise falcon.HTTPRouteNotFound()

    def on_delete(self, req: falcon.Request, resp: falcon.Response, rest: str) -> None:
        raise gone("DELETE", "unload")
