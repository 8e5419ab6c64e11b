"""OpenAI's logprob shapes from the engine's (token id, float) pairs.

Chat: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}``.
Completions: ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``.
Token strings and bytes come from the tokenizer (``Tokenization.token_entry``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from frontend.generation import TokenLogprob

# OpenAI's limits: chat top_logprobs 0..20, completions logprobs 0..5.
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

TokenEntry = Callable[[int], tuple[str, bytes]]


def _chat_entry(token_id: int, logprob: float, entry: TokenEntry) -> dict[str, Any]:
    token, raw = entry(token_id)
    return {"token": token, "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokens: Optional[Sequence[TokenLogprob]], entry: TokenEntry) -> Optional[dict[str, Any]]:
    if tokens is None:
        return None
    return {
        "content": [
            {**_chat_entry(t.token_id, t.logprob, entry), "top_logprobs": [_chat_entry(i, v, entry) for i, v in t.top]}
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(
    tokens: Optional[Sequence[TokenLogprob]], entry: TokenEntry, offset_base: int = 0
) -> Optional[dict[str, Any]]:
    """``offset_base``: characters before the completion text (an echoed prompt)."""
    if tokens is None:
        return None
    top: list[dict[str, float]] = []
    for t in tokens:
        top.append({entry(i)[0]: v for i, v in t.top})
    return {
        "tokens": [entry(t.token_id)[0] for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": top,
        "text_offset": [offset_base + t.offset for t in tokens],
    }
