"""The one catalogue of wire messages between frontend workers and the engine.

Every message is a tagged msgspec Struct encoded as msgpack (never pickle).
A frontend worker opens with ``Hello``; the engine answers ``Welcome`` (same
``PROTOCOL_VERSION``) or ``Rejected``. Every ``Generate`` ends with exactly one
``TokenDelta`` whose ``finish_reason`` is set: that is the request's final
outcome (finished, aborted or failed).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import msgspec

# Bump on any incompatible change to a struct below; the handshake checks it.
PROTOCOL_VERSION = 1

# Final outcomes a request can have. "stop"/"length" are OpenAI's finish
# reasons; "abort" and "error" never reach a client as a finish_reason.
FinishReason = Literal["stop", "length", "abort", "error"]
FINAL_REASONS: frozenset[str] = frozenset({"stop", "length", "abort", "error"})


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


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Facts about the one loaded model, announced in the handshake."""

    model_id: str
    model_path: str
    adapter_path: Optional[str]
    context_length: int
    eos_token_ids: list[int]
    vocab_size: int
    created: int  # unix seconds when the engine loaded the model


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


class TokenDelta(msgspec.Struct, array_like=True, frozen=True):
    """New tokens of one request produced by one engine step.

    ``finish_reason`` set means this is the request's last message.
    ``token_ids`` never holds the EOS/stop token that ended the request.
    """

    request_id: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    # Prompt tokens that the engine found in its prefix cache (first delta only).
    cached_prompt_tokens: int = 0
    error: Optional[str] = None


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


class Pong(msgspec.Struct, tag=True, frozen=True):
    nonce: int


FrontendMessage = Union[Hello, Generate, Abort, StatusQuery, Ping]
EngineMessage = Union[Welcome, Rejected, StepOutputs, EngineStatus, Pong]
