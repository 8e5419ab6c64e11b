"""GET /openapi.json: the API this server speaks, generated from its pydantic models.

Requests: the very models that validate them (frontend.protocol). Responses:
the models below, which describe the dicts frontend.protocol builds (tests
validate real responses against this document, so it cannot drift).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from frontend.protocol import ChatCompletionRequest, CompletionRequest

OPENAPI_VERSION = "3.1.0"
API_TITLE = "MLX Engine Server"
API_VERSION = "0.2.0"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Doc):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(_Doc):
    error: ErrorDetail


class TopLogprob(_Doc):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Doc):
    content: Optional[list[TokenLogprob]]
    refusal: Optional[list[TokenLogprob]]


class FunctionCall(_Doc):
    name: str
    arguments: str  # JSON text


class ToolCall(_Doc):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class PromptTokensDetails(_Doc):
    cached_tokens: int


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: Optional[str]
    refusal: Optional[str]
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs]
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Doc):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None


class ChatChunkChoice(_Doc):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChoiceLogprobs]
    finish_reason: Optional[Literal["stop", "length", "tool_calls"]]


class ChatCompletionChunk(_Doc):
    """One server-sent event of a streamed chat completion (the last: usage, no choices)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(_Doc):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[Literal["stop", "length"]]  # null in stream chunks before the last


class Completion(_Doc):
    """A text completion, or one server-sent event of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int
    max_model_len: int
    adapter: Optional[str]
    path: str


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


_REQUESTS = (ChatCompletionRequest, CompletionRequest)
_RESPONSES = (ErrorResponse, ChatCompletion, ChatCompletionChunk, Completion, ModelList)


_ANY_OBJECT = {"application/json": {"schema": {"type": "object"}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors() -> dict[str, Any]:
    body = {"application/json": {"schema": _ref(ErrorResponse)}}
    return {
        "400": {"description": "Invalid request (OpenAI error JSON naming the parameter)", "content": body},
        "401": {"description": "Missing or wrong API key (when keys are configured)", "content": body},
        "413": {"description": "Request body too large", "content": body},
        "500": {"description": "Generation failed in the engine", "content": body},
        "503": {"description": "Engine unavailable or shutting down (Retry-After)", "content": body},
    }


def _generation(summary: str, request: type[BaseModel], answer: type[BaseModel], chunk: type[BaseModel]) -> dict:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {
                "200": {
                    "description": "The answer; with stream=true, server-sent events of chunks ending in [DONE]",
                    "content": {
                        "application/json": {"schema": _ref(answer)},
                        "text/event-stream": {"schema": _ref(chunk)},
                    },
                },
                **_errors(),
            },
        }
    }


@functools.lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        *((m, "validation") for m in _REQUESTS),
        *((m, "serialization") for m in _RESPONSES),
    ]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": API_TITLE,
            "version": API_VERSION,
            "description": "OpenAI-compatible API for one MLX model (see README.md for the fields honoured).",
        },
        "paths": {
            "/v1/chat/completions": _generation(
                "Chat completion", ChatCompletionRequest, ChatCompletion, ChatCompletionChunk
            ),
            "/v1/completions": _generation("Text completion", CompletionRequest, Completion, Completion),
            "/v1/models": {
                "get": {
                    "summary": "The one loaded model",
                    "responses": {"200": {"description": "Model list", "content": _json(ModelList)}},
                }
            },
            "/v1/mlx/status": {
                "get": {
                    "summary": "Model, engine state, queue and prefix cache",
                    "responses": {"200": {"description": "Status", "content": _ANY_OBJECT}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1", "content": _ANY_OBJECT}},
                }
            },
        },
        "components": {"schemas": schemas["$defs"]},
    }


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}
