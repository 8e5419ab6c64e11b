"""POST /tokenize and POST /detokenize: vLLM's token counting endpoints.

A prompt (encoded as /v1/completions encodes it) or chat messages (rendered
as /v1/chat/completions renders them, tools and template variables
included) in, token ids and their count out; token ids in, text out. Clients
use them to count and budget tokens against ``max_model_len``.
"""

from __future__ import annotations

from typing import Any

import falcon
from pydantic import BaseModel, ConfigDict, Field

from frontend.context import AppContext
from frontend.errors import invalid_request
from frontend.openapi import Operation
from frontend.protocol import ChatMessage, template_messages
from frontend.request_body import read_request
from frontend.shapes import Shape
from frontend.tokenization import ChatTemplateError, reserved_template_kwargs

_ONE_INPUT = {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one: ``prompt`` or ``messages``."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_ONE_INPUT)

    model: str | None = None  # any value: this server has one model
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # None: as the generation endpoints do (true for a prompt, false for messages).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def token_ids(self, ctx: AppContext) -> list[int]:
        tok = ctx.tokenization
        if (self.prompt is None) == (self.messages is None):
            raise invalid_request("send either prompt or messages (one of them)", param="prompt")
        if self.prompt is not None:
            return tok.encode_prompt(self.prompt, add_special_tokens=self.add_special_tokens is not False)
        assert self.messages is not None
        if self.add_generation_prompt and self.continue_final_message:
            raise invalid_request(
                "add_generation_prompt and continue_final_message cannot both be true", param="continue_final_message"
            )
        template_kwargs = self.chat_template_kwargs or {}
        reserved = sorted(set(template_kwargs) & reserved_template_kwargs())
        if reserved:
            raise invalid_request(
                f"chat_template_kwargs may only set template variables, not {', '.join(reserved)}",
                param="chat_template_kwargs",
            )
        try:
            return tok.render_chat(
                template_messages(self.messages),
                tools=self.tools,
                template_kwargs=template_kwargs,
                add_generation_prompt=self.add_generation_prompt,
                continue_final_message=self.continue_final_message,
                add_special_tokens=bool(self.add_special_tokens),
            )
        except ChatTemplateError as exc:
            raise invalid_request(str(exc), param="messages") from None


class TokenizeResponse(Shape):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(Shape):
    prompt: str


class TokenizeResource:
    openapi = {
        "post": Operation(
            "Token ids of a prompt or of chat messages", request=TokenizeRequest, response=TokenizeResponse,
            errors=(400, 401, 413),
        )
    }  # fmt: skip

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = self._ctx
        request = read_request(req, TokenizeRequest, ctx.settings.max_request_bytes)
        ids = request.token_ids(ctx)
        strs = {"token_strs": ctx.tokenization.hf.convert_ids_to_tokens(ids)} if request.return_token_strs else {}
        body = TokenizeResponse(count=len(ids), max_model_len=ctx.engine.model.context_length, tokens=ids, **strs)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = body.dump()


class DetokenizeResource:
    openapi = {
        "post": Operation("Text of token ids", request=DetokenizeRequest, response=DetokenizeResponse, errors=(400, 401, 413))
    }  # fmt: skip

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = self._ctx
        request = read_request(req, DetokenizeRequest, ctx.settings.max_request_bytes)
        vocab_size = ctx.tokenization.vocab_size
        bad = next((i for i, t in enumerate(request.tokens) if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise invalid_request(
                f"token id {request.tokens[bad]} is outside the vocabulary (0..{vocab_size - 1})",
                param=f"tokens[{bad}]",
            )
        text = ctx.tokenization.hf.decode(request.tokens)  # special tokens included, as vLLM
        resp.content_type = falcon.MEDIA_JSON
        resp.data = DetokenizeResponse(prompt=text).dump()
