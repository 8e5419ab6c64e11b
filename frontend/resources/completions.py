"""POST /v1/completions (the legacy text completion API)."""

from __future__ import annotations

import logging
from typing import Union

import falcon

from frontend import protocol
from frontend.context import AppContext
from frontend.disconnect import client_gone_check
from frontend.errors import invalid_request
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
from frontend.tokenization import Tokenization
from ipc.messages import Generate

log = logging.getLogger(__name__)


def _prompt_ids(item: Union[str, list[int]], tok: Tokenization) -> list[int]:
    return tok.encode_prompt(item) if isinstance(item, str) else list(item)


def _echo_text(item: Union[str, list[int]], tok: Tokenization) -> str:
    # A string prompt is echoed verbatim; token prompts as their text.
    return item if isinstance(item, str) else tok.decode(item)


class CompletionsResource:
    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = self._ctx
        settings, model, tok = ctx.settings, ctx.engine.model, ctx.tokenization
        request = read_request(req, protocol.CompletionRequest, settings.max_request_bytes)
        request.check_supported()
        n = request.choices_per_prompt
        if n > settings.max_n:
            raise invalid_request(f"n must be at most {settings.max_n}", param="n")
        items = request.prompt_items()
        if len(items) * n > settings.max_choices:
            raise invalid_request(
                f"{len(items)} prompts x n={n} is more than {settings.max_choices} choices per request", param="prompt"
            )
        stops = request.stop_strings()
        sampling = request.sampling(model.vocab_size)
        constraint = request.response_constraint()
        prompts = [_prompt_ids(item, tok) for item in items]
        max_tokens = []
        for ids in prompts:
            check_prompt_ids(ids, model.vocab_size, "prompt")
            max_tokens.append(
                resolve_max_tokens(request.max_tokens, len(ids), model, settings.default_max_tokens, "prompt")
            )

        response_id, created = new_response_id("cmpl"), now()
        # OpenAI orders choices prompt by prompt: index = prompt * n + choice.
        generates = [
            Generate(
                request_id=f"{response_id}-{p * n + j}",
                prompt_token_ids=ids,
                max_tokens=max_tokens[p],
                sampling=choice_sampling(sampling, j),
                constraint=constraint,
                logprobs=request.logprobs,
            )
            for p, ids in enumerate(prompts)
            for j in range(n)
        ]
        echoes = [_echo_text(items[i // n], tok) for i in range(len(generates))] if request.echo else []
        runs = start_runs(
            ctx.engine,
            generates,
            lambda index, stream: ChoiceRun(
                index,
                stream,
                tok.detokenizer(trim_leading_space=False),  # text = its tokens, leading space too (as OpenAI)
                stops,
                prompt_group=index // n,
                logprobs=request.logprobs is not None,
            ),
        )
        log.debug("%s: %d prompts, n %d", response_id, len(prompts), n)

        def usage() -> dict:
            return protocol.usage(*usage_counts([len(ids) for ids in prompts], runs))

        respond(
            resp,
            runs,
            stream=bool(request.stream),
            shaper=protocol.CompletionChunks(
                response_id, created, model.model_id, request.include_usage, tok.token_entry, echoes
            ),
            usage_of=usage,
            include_usage=request.include_usage,
            body_of=lambda choices: protocol.text_completion(
                response_id, created, model.model_id, choices, usage(), tok.token_entry
            ),
            prefixes=echoes,
            client_gone=client_gone_check(req),
        )
