"""What OpenAI's chat and completion streams share: chunk heads, the usage chunk, [DONE], error events."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from frontend import pipeline, sse
from frontend.openai_shapes import ChatCompletionChunk, Completion, Usage

Chunk = ChatCompletionChunk | Completion


def head(generation: pipeline.Generation) -> dict[str, Any]:
    """id, created and model: the same on a response and on every chunk of it."""
    return {"id": generation.response_id, "created": generation.created, "model": generation.model_id}


class OpenAIStream:
    """Pipeline events as ``data:`` chunks of one response, then ``[DONE]`` (none after an error)."""

    chunk_type: type[Chunk]
    object_name: str

    def __init__(self, generation: pipeline.Generation, include_usage: bool) -> None:
        self._generation = generation
        self._include_usage = include_usage

    def chunk(self, choices: list[Any], usage: Usage | None = None) -> bytes:
        fields: dict[str, Any] = {**head(self._generation), "object": self.object_name, "choices": choices}
        if self._include_usage:
            fields["usage"] = usage  # null on every chunk but the last (and absent without include_usage)
        return sse.event(self.chunk_type(**fields))

    def completed(self, event: pipeline.Completed) -> Iterable[bytes]:
        if self._include_usage:
            yield self.chunk([], usage=Usage.of(*event.usage, reasoning_tokens=self._generation.reasoning_tokens()))
        yield sse.DONE

    def failed(self, event: pipeline.Failed) -> Iterable[bytes]:
        return [sse.event(event.error.body())]

    def waiting(self, event: pipeline.Waiting) -> Iterable[bytes]:
        return [sse.KEEPALIVE_COMMENT]
