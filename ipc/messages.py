"""The one catalogue of wire messages between frontend workers and the engine.

Every message is a tagged msgspec Struct encoded as msgpack: plain data, never Python objects.
A frontend worker opens with ``Hello``; the engine answers ``Welcome`` (same
``PROTOCOL_VERSION``) or ``Rejected``. Every ``Generate`` ends with exactly one
``TokenDelta`` whose ``finish_reason`` is set: that is the request's final
outcome (finished, aborted or failed).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import msgspec

# Bump on any incompatible change to a struct below; the handshake checks it.
# 2: Generate.logprobs and .constraint, TokenDelta.logprobs/top_logprobs,
#    ModelInfo.tool_parser/tool_call_start/tool_call_end.
PROTOCOL_VERSION = 3

# OpenAI's floor for a log probability ("very unlikely"); masked tokens
# (-inf) are reported as this, since JSON has no infinity.
LOGPROB_FLOOR = -9999.0

# Final outcomes a request can have. "stop"/"length" are OpenAI's finish
# reasons; "abort" and "error" never reach a client as a finish_reason.
# "overloaded": refused because the engine's queue is full (HTTP 429).
FinishReason = Literal["stop", "length", "abort", "error", "overloaded"]
FINAL_REASONS: frozenset[str] = frozenset({"stop", "length", "abort", "error", "overloaded"})


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-request sampling, applied in the engine by mlx-lm's samplers."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None


class Constraint(msgspec.Struct, frozen=True, kw_only=True):
    """Constrained decoding: the output must match this grammar, and may end
    (EOS) only where the grammar is complete.

    ``kind`` "json_schema": ``text`` is a JSON schema (its "x-guidance" key
    sets the JSON layout options); "lark": ``text`` is a Lark grammar in
    llguidance's dialect (``%json{...}`` embeds a schema). The engine compiles
    it with its tokenizer and caches the result by (kind, text).
    """

    kind: Literal["json_schema", "lark"]
    text: str


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Facts about the one loaded model, announced in the handshake."""

    model_id: str
    model_path: str
    adapter_path: Optional[str]
    context_length: int
    eos_token_ids: list[int]
    vocab_size: int
    created: int  # unix seconds when the engine loaded the model
    # How the model writes tool calls, as mlx-lm infers it from the chat
    # template (its tool_parsers module name, e.g. "json_tools") and the text
    # that opens and closes one call; None when the model has no tool calling.
    tool_parser: Optional[str] = None
    tool_call_start: Optional[str] = None
    tool_call_end: Optional[str] = None


# ---------------------------------------------------------------- frontend -> engine


class Hello(msgspec.Struct, tag=True, frozen=True):
    worker_id: str
    protocol_version: int


class Generate(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    # None: stop on the model's EOS ids. An empty list: never stop on EOS.
    stop_token_ids: Optional[list[int]] = None
    # None: no logprobs. k >= 0: the sampled token's logprob plus the k most
    # likely tokens at each position (TokenDelta.logprobs / top_logprobs).
    logprobs: Optional[int] = None
    constraint: Optional[Constraint] = None


class Abort(msgspec.Struct, tag=True, frozen=True):
    """Idempotent: unknown or already finished ids are ignored."""

    request_ids: list[str]


class StatusQuery(msgspec.Struct, tag=True, frozen=True):
    query_id: str


class Ping(msgspec.Struct, tag=True, frozen=True):
    """Liveness probe; the engine answers Pong with the same nonce."""

    nonce: int


# ---------------------------------------------------------------- engine -> frontend


class Welcome(msgspec.Struct, tag=True, frozen=True):
    protocol_version: int
    model: ModelInfo


class Rejected(msgspec.Struct, tag=True, frozen=True):
    reason: str


class TokenDelta(msgspec.Struct, array_like=True, frozen=True, omit_defaults=True):
    """New tokens of one request produced by one engine step.

    ``finish_reason`` set means this is the request's last message.
    ``token_ids`` never holds the EOS/stop token that ended the request.
    Trailing fields left at their defaults are not encoded (omit_defaults),
    so a delta without logprobs costs what it did before they existed.
    """

    request_id: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    # Prompt tokens that the engine found in its prefix cache (first delta only).
    cached_prompt_tokens: int = 0
    error: Optional[str] = None
    # Only for requests that asked (Generate.logprobs): one entry per token_ids
    # entry. logprobs[i]: log-probability of token_ids[i]; top_logprobs[i]:
    # (token id, logprob) of the k most likely tokens there, most likely first.
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None


class StepOutputs(msgspec.Struct, tag=True, frozen=True):
    """Everything one engine step produced for one frontend worker."""

    deltas: list[TokenDelta]


class EngineStatus(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    query_id: str
    state: str  # "ready" | "draining"
    uptime_s: float
    running_requests: int
    queued_requests: int
    tokens_generated: int
    prompt_tokens_processed: int
    requests_finished: int
    prompt_cache_entries: int
    prompt_cache_bytes: int
    prompt_cache_hits: int
    prompt_cache_hit_tokens: int
    active_memory_bytes: int
    peak_memory_bytes: int
    # How often the supervisor restarted the engine before this one (0: first start).
    restarts: int = 0
    # Engine steps run and their wall time, sends to the workers included:
    # the time per step over a window is (delta step_seconds) / (delta steps).
    steps: int = 0
    step_seconds: float = 0.0


class Pong(msgspec.Struct, tag=True, frozen=True):
    """Also the engine's load, so workers can refuse work (429) before it queues."""

    nonce: int
    running_requests: int = 0
    queued_requests: int = 0


FrontendMessage = Union[Hello, Generate, Abort, StatusQuery, Ping]
EngineMessage = Union[Welcome, Rejected, StepOutputs, EngineStatus, Pong]
