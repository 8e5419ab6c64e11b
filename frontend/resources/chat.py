"""POST /v1/chat/completions."""

from __future__ import annotations

import logging

import falcon

from frontend import protocol
from frontend.context import AppContext
from frontend.disconnect import client_gone_check
from frontend.errors import invalid_request, unsupported
from frontend.generation import (
    ChoiceRun,
    check_prompt_ids,
    choice_sampling,
    new_response_id,
    now,
    read_request,
    resolve_max_tokens,
    respond,
    start_runs,
    usage_counts,
)
from frontend.tokenization import ChatTemplateError, reserved_template_kwargs
from ipc.messages import Generate

log = logging.getLogger(__name__)


class ChatCompletionsResource:
    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = self._ctx
        settings, model, tok = ctx.settings, ctx.engine.model, ctx.tokenization
        request = read_request(req, protocol.ChatCompletionRequest, settings.max_request_bytes)
        request.check_supported()
        n = request.choices_per_prompt
        if n > settings.max_n:
            raise invalid_request(f"n must be at most {settings.max_n}", param="n")
        stops = request.stop_strings()
        sampling = request.sampling(model.vocab_size)
        tools = request.tool_plan(model, tok.marker_token_id)
        constraint = request.constraint(tools)
        template_kwargs = request.chat_template_kwargs or {}
        reserved = sorted(set(template_kwargs) & reserved_template_kwargs())
        if reserved:
            raise invalid_request(
                f"chat_template_kwargs may only set template variables, not {', '.join(reserved)}",
                param="chat_template_kwargs",
            )
        for name in protocol.TEMPLATE_VARIABLE_FIELDS:
            value = getattr(request, name)
            if value is None:
                continue
            if not tok.template_mentions(name):
                raise unsupported(name, f"{name} is not supported: this model's chat template does not use it")
            template_kwargs = {name: value, **template_kwargs}
        try:
            prompt = tok.render_chat(
                request.template_messages(), tools=tools.template_tools, template_kwargs=template_kwargs
            )
        except ChatTemplateError as exc:
            raise invalid_request(str(exc), param="messages") from None
        check_prompt_ids(prompt, model.vocab_size, "messages")
        max_tokens = resolve_max_tokens(
            request.requested_max_tokens, len(prompt), model, settings.default_max_tokens, "messages"
        )

        response_id, created = new_response_id("chatcmpl"), now()
        generates = [
            Generate(
                request_id=f"{response_id}-{i}",
                prompt_token_ids=prompt,
                max_tokens=max_tokens,
                sampling=choice_sampling(sampling, i),
                constraint=constraint,
                logprobs=request.engine_logprobs,
            )
            for i in range(n)
        ]
        want_logprobs = request.engine_logprobs is not None
        runs = start_runs(
            ctx.engine,
            generates,
            lambda i, stream: ChoiceRun(
                i,
                stream,
                tok.detokenizer(keep_token_ids=tools.marker_ids),
                stops,
                logprobs=want_logprobs,
                tools=tools.splitter(),
            ),
        )
        log.debug("%s: %d prompt tokens, max_tokens %d, n %d", response_id, len(prompt), max_tokens, n)

        def usage() -> dict:
            return protocol.usage(*usage_counts([len(prompt)], runs))

        respond(
            resp,
            runs,
            stream=bool(request.stream),
            shaper=protocol.ChatChunks(response_id, created, model.model_id, request.include_usage, tok.token_entry),
            usage_of=usage,
            include_usage=request.include_usage,
            body_of=lambda choices: protocol.chat_completion(
                response_id, created, model.model_id, choices, usage(), tok.token_entry
            ),
            client_gone=client_gone_check(req),
        )
