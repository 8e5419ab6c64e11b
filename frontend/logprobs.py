"""OpenAI's logprob shapes from the engine's (token id, float) pairs.

Chat: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}``;
Responses: ``output_text.logprobs`` is that ``content`` list.
Completions: ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``.
Token strings and bytes come from the tokenizer (``Tokenization.token_entry``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from frontend.generation import TokenLogprob
from frontend.openai_shapes import ChoiceLogprobs, CompletionLogprobs, TopLogprob
from frontend.openai_shapes import TokenLogprob as TokenLogprobShape

# OpenAI's limits: chat top_logprobs 0..20, completions logprobs 0..5.
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# What OpenAI reports for a token that cannot be sampled (JSON has no -Infinity).
IMPOSSIBLE_LOGPROB = -9999.0

TokenEntry = Callable[[int], tuple[str, bytes]]


def _finite(logprob: float) -> float:
    return logprob if logprob >= IMPOSSIBLE_LOGPROB else IMPOSSIBLE_LOGPROB


def _top(token_id: int, logprob: float, entry: TokenEntry) -> TopLogprob:
    token, raw = entry(token_id)
    return TopLogprob(token=token, logprob=_finite(logprob), bytes=list(raw))


def token_logprobs(tokens: Sequence[TokenLogprob], entry: TokenEntry) -> list[TokenLogprobShape]:
    """Chat's ``content`` list; the Responses API's ``logprobs`` have the same shape."""
    shapes = []
    for t in tokens:
        token, raw = entry(t.token_id)
        top = [_top(i, v, entry) for i, v in t.top]
        shapes.append(TokenLogprobShape(token=token, logprob=_finite(t.logprob), bytes=list(raw), top_logprobs=top))
    return shapes


def chat_logprobs(tokens: Sequence[TokenLogprob] | None, entry: TokenEntry) -> ChoiceLogprobs | None:
    if tokens is None:
        return None
    return ChoiceLogprobs(content=token_logprobs(tokens, entry), refusal=None)


def completion_logprobs(
    tokens: Sequence[TokenLogprob] | None, entry: TokenEntry, offset_base: int = 0
) -> CompletionLogprobs | None:
    """``offset_base``: characters before the completion text (an echoed prompt)."""
    if tokens is None:
        return None
    return CompletionLogprobs(
        tokens=[entry(t.token_id)[0] for t in tokens],
        token_logprobs=[_finite(t.logprob) for t in tokens],
        top_logprobs=[{entry(i)[0]: _finite(v) for i, v in t.top} for t in tokens],
        text_offset=[offset_base + t.offset for t in tokens],
    )
