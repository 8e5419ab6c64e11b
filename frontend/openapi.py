"""GET /openapi.json: the API this server speaks, generated from its routes and models.

Paths come from ``frontend.app.ROUTES``: each resource class declares its
``openapi`` operations (method -> ``Operation``). Requests are the very models
that validate them; responses the very ``Shape`` classes that serialise them,
so the document cannot drift from what is served.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from frontend.errors import ErrorResponse

OPENAPI_VERSION = "3.1.0"
API_TITLE = "MLX Engine Server"
API_VERSION = "0.2.0"

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_ERROR_DESCRIPTIONS = {
    400: "Invalid request (OpenAI error JSON naming the parameter)",
    401: "Missing or wrong API key (when keys are configured)",
    404: "Not found",
    410: "Removed in 0.2 (the message says what to do instead)",
    413: "Request body too large",
    429: "The engine's queue is full (Retry-After)",
    500: "Generation failed in the engine",
    503: "Engine unavailable or shutting down (Retry-After)",
}
GENERATION_ERRORS = (400, 401, 413, 429, 500, 503)


@dataclass(frozen=True)
class Operation:
    """One method of one route, as the document describes it."""

    summary: str
    request: type[BaseModel] | None = None  # the JSON body's model
    response: type[BaseModel] | None = None  # the 200 body's model; None: some JSON object
    stream: type[BaseModel] | None = None  # with stream=true: each event's data
    media_type: str = "application/json"
    errors: tuple[int, ...] = ()
    same_body: tuple[int, ...] = ()  # other statuses whose body is ``response`` too
    removed: bool = False  # answers 410 (and ``errors``), never 200
    error: type[BaseModel] = ErrorResponse  # the body of ``errors`` (Anthropic's routes have their own)
    named_events: bool = False  # stream: ``event: TYPE`` lines and no [DONE] (Anthropic's Messages)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": self.summary, "responses": {}}
        if self.request is not None:
            out["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(self.request)}}}
        if not self.removed:
            for status in (200, *self.same_body):
                out["responses"][str(status)] = self._success()
        for status in (410, *self.errors) if self.removed else self.errors:
            out["responses"][str(status)] = {
                "description": _ERROR_DESCRIPTIONS[status],
                "content": {"application/json": {"schema": _ref(self.error)}},
            }
        return out

    def _success(self) -> dict[str, Any]:
        if not self.media_type.endswith("json"):
            return {"description": self.summary, "content": {self.media_type: {"schema": {"type": "string"}}}}
        schema = _ref(self.response) if self.response is not None else _ANY_OBJECT
        content: dict[str, Any] = {self.media_type: {"schema": schema}}
        if self.stream is None:
            return {"description": self.summary, "content": content}
        if self.named_events:
            content["text/event-stream"] = {"schema": _named_sse_event(self.stream, self.error)}
            return {"description": "The answer; with stream=true, named server-sent events", "content": content}
        content["text/event-stream"] = {"schema": _sse_event(self.stream, self.error)}
        return {
            "description": "The answer; with stream=true, server-sent events of chunks ending in [DONE]",
            "content": content,
        }

    def models(self) -> list[tuple[type[BaseModel], Literal["validation", "serialization"]]]:
        out: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = []
        if self.request is not None:
            out.append((self.request, "validation"))
        out += [(m, "serialization") for m in (self.response, self.stream, self.error) if m is not None]
        return out


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _sse_event(chunk: type[BaseModel], error: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1: ``schema`` of text/event-stream describes each event,
    its fields as strings): ``data`` is [DONE] or JSON text of a chunk, or of the error
    that ends a stream failing after its headers were sent."""
    payload = {"anyOf": [_ref(chunk), _ref(error)]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                ]
            }
        },
    }


def _named_sse_event(payload: type[BaseModel], error: type[BaseModel]) -> dict[str, Any]:
    """One named event: ``event`` is its payload's ``type``, ``data`` that payload's JSON text."""
    data = {"anyOf": [_ref(payload), _ref(error)]}
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string"},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        },
    }


_FALCON_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def _path(uri_template: str) -> tuple[str, list[dict[str, Any]]]:
    """Falcon's ``/v1/models/{model_id:path}`` as OpenAPI's ``/v1/models/{model_id}`` and its parameters."""
    names = _FALCON_PARAM.findall(uri_template)
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in names]
    return _FALCON_PARAM.sub(r"{\1}", uri_template), parameters


def document(routes: dict[str, type]) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (URI template -> resource class with ``openapi``)."""
    paths: dict[str, Any] = {}
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [(ErrorResponse, "serialization")]
    for uri_template, resource in routes.items():
        path, parameters = _path(uri_template)
        operations: dict[str, Operation] = resource.openapi  # every route's resource declares them
        item: dict[str, Any] = {method: op.describe() for method, op in operations.items()}
        if parameters:
            item["parameters"] = parameters
        paths[path] = item
        for op in operations.values():
            models += op.models()
    _, schemas = models_json_schema(list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}")
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": API_TITLE,
            "version": API_VERSION,
            "description": "OpenAI-compatible API for one MLX model (see README.md for the fields honoured).",
        },
        "paths": paths,
        "components": {"schemas": schemas["$defs"]},
    }


@functools.lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    from frontend.app import ROUTES  # here, not above: the routes' resources import this module

    return document(ROUTES)
