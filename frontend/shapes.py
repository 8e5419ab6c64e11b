"""The base of every response model: one class both serialises a body and is its schema in /openapi.json."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Shape(BaseModel):
    """A response body or event. A field with a default is left out of the JSON
    unless it was set: APIs omit keys (OpenAI's ``usage`` on stream chunks, the
    keys of a delta that did not change) where required fields are always there,
    null or not."""

    model_config = ConfigDict(extra="forbid")

    def dump(self) -> bytes:
        return self.__pydantic_serializer__.to_json(self, exclude_unset=True)
