"""Reading a request body into its pydantic model: every problem is a 4xx naming the field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import falcon
import msgspec
from pydantic import BaseModel, ValidationError

from frontend.errors import APIError, invalid_request

_Model = TypeVar("_Model", bound=BaseModel)
# pydantic's errors for a discriminator field that is missing or has no matching member.
_TAG_ERRORS = frozenset({"union_tag_invalid", "union_tag_not_found"})


def read_request(req: falcon.Request, model: type[_Model], max_bytes: int) -> _Model:
    """Parse the JSON body into ``model``; any problem is a 4xx naming the field."""
    if req.content_length is not None and req.content_length > max_bytes:
        raise APIError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise APIError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    if not raw.strip():
        raise invalid_request("the request body is empty; expected a JSON object")
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, data) from None


def _validation_error(exc: ValidationError, data: dict[str, Any]) -> APIError:
    first = exc.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    if first["type"] in _TAG_ERRORS:  # a discriminated union (messages by role): name the tag field
        loc += (first["ctx"]["discriminator"].strip("'"),)
    param = _param(loc, data)
    if first["type"] in ("missing", "union_tag_not_found"):
        return invalid_request(f"missing required parameter: {param!r}", param=param)
    message = first["msg"].removeprefix("Value error, ")  # our own validators' ValueErrors
    return invalid_request(f"invalid value for {param!r}: {message}", param=param)


def _param(loc: Sequence[Any], data: Any) -> str | None:
    """``messages[0].content`` from a pydantic location, following only the
    steps that exist in the input (pydantic adds union member names and tags;
    only a missing field's own name is kept)."""
    out = ""
    node = data
    for k, step in enumerate(loc):
        if isinstance(node, dict) and isinstance(step, str) and step not in node and k < len(loc) - 1:
            continue  # a union member's name or tag
        if isinstance(node, dict) and isinstance(step, str):
            out += f".{step}" if out else step
            node = node.get(step)
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            out += f"[{step}]"
            node = node[step]
        else:
            break
    return out or None
