"""The one catalogue of wire messages between frontend workers and the engine.

Every message is a tagged msgspec Struct encoded as msgpack: plain data, never Python objects.
A frontend worker opens with ``Hello``; the engine answers ``Welcome`` (same
``PROTOCOL_VERSION``) or ``Rejected``. Every ``Generate`` ends with exactly one
``TokenDelta`` whose ``finish_reason`` is set: that is the request's final
outcome (finished, aborted or failed). A worker announces each generation
request with ``Arriving`` the moment its handler starts (from a second socket)
and closes the announcement with ``Settled`` after the request's Generates. Inside a sharded engine, rank 0 sends
every other rank the ``StepPlan`` of each step, a ``GroupPoll`` about every
second, ``GroupIdle`` while it has no work and a ``GroupStop`` at the end.

Structs sent many times a second are ``gc=False``: they hold no reference
cycles, so the garbage collector need not track them.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# Bump on any incompatible change to a struct below; the handshake checks it.
# 1: Hello/Welcome/Rejected, Generate, Abort, StatusQuery, Ping/Pong, StepOutputs.
# 2: Generate.logprobs and .constraint, TokenDelta.logprobs/top_logprobs,
#    ModelInfo.tool_parser/tool_call_start/tool_call_end.
# 3: finish_reason "overloaded", Pong.running_requests/queued_requests
#    (later, with defaults: EngineStatus.restarts, .steps, .step_seconds).
# 4: TokenDelta.finish_reason is a FinishReason; EngineStatus.state is gone
#    (an engine that answers is ready; draining is the frontend's drain flag);
#    StepPlan (rank 0 to the other ranks of a sharded engine).
# 5: EngineStatus.group (a sharded engine's ranks); GroupPoll, GroupIdle and
#    GroupStop (rank 0 to the other ranks).
# 6: finish_reason "too_large"; EngineStatus.kv_budget_bytes, .kv_reserved_bytes,
#    .kv_bytes_per_token, .kv_bits, .kv_group_size (with defaults).
# 7: a worker's frame set may carry several messages (everything its requests
#    queued since its last send): [identity, message, message, ...]; GroupStatus.backend "nccl".
# 8: Arriving (from a worker's second socket) and Settled.
PROTOCOL_VERSION = 8

# OpenAI's floor for a log probability ("very unlikely"); masked tokens
# (-inf) are reported as this, since JSON has no infinity.
LOGPROB_FLOOR = -9999.0

# Final outcomes a request can have. "stop"/"length" are OpenAI's finish
# reasons; "abort" and "error" never reach a client as a finish_reason.
# "overloaded": refused because the engine's queue is full (HTTP 429).
# "too_large": refused because no load would let it run: it exceeds the
# context length or needs more KV cache than the engine's whole budget (HTTP 400).
FinishReason = Literal["stop", "length", "abort", "error", "overloaded", "too_large"]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """Per-request sampling, applied in the engine by mlx-lm's samplers."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None


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
    adapter_path: str | None
    context_length: int
    eos_token_ids: list[int]
    vocab_size: int
    created: int  # unix seconds when the engine loaded the model
    # How the model writes tool calls, as mlx-lm infers it from the chat
    # template (its tool_parsers module name, e.g. "json_tools"; "harmony" for
    # gpt-oss, which mlx-lm does not parse) and the text that opens and closes
    # one call; None when the model has no tool calling.
    tool_parser: str | None = None
    tool_call_start: str | None = None
    tool_call_end: str | None = None


# ---------------------------------------------------------------- frontend -> engine


class Hello(msgspec.Struct, tag=True, frozen=True):
    worker_id: str
    protocol_version: int


class Generate(msgspec.Struct, tag=True, frozen=True, kw_only=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    # None: stop on the model's EOS ids. An empty list: never stop on EOS.
    stop_token_ids: list[int] | None = None
    # None: no logprobs. k >= 0: the sampled token's logprob plus the k most
    # likely tokens at each position (TokenDelta.logprobs / top_logprobs).
    logprobs: int | None = None
    constraint: Constraint | None = None


class Arriving(msgspec.Struct, tag=True, frozen=True, gc=False):
    """A generation request began on ``worker`` (its identity): its Generates or
    nothing follow, then one Settled. Sent the moment its handler starts, on a
    socket of its own, so it overtakes the frame set in which the worker forwards
    the rest of a burst: an engine that knows requests are on their way holds the
    ones that came for them (at most ADMISSION_HOLD_MAX_S) and prefills them together."""

    worker: str  # the identity of the worker's main socket, which its Generates and the Settled come from
    seq: int  # this announcement among the worker's


class Settled(msgspec.Struct, tag=True, frozen=True, gc=False):
    """The request an Arriving announced has sent its Generates, or never will.
    Sent after those Generates, in order; it may still overtake its Arriving."""

    seq: int


class Abort(msgspec.Struct, tag=True, frozen=True, gc=False):
    """Idempotent: unknown or already finished ids are ignored."""

    request_ids: list[str]


class StatusQuery(msgspec.Struct, tag=True, frozen=True):
    query_id: str


class Ping(msgspec.Struct, tag=True, frozen=True, gc=False):
    """Liveness probe; the engine answers Pong with the same nonce."""

    nonce: int


# ---------------------------------------------------------------- engine -> frontend


class Welcome(msgspec.Struct, tag=True, frozen=True):
    protocol_version: int
    model: ModelInfo


class Rejected(msgspec.Struct, tag=True, frozen=True):
    reason: str


class TokenDelta(msgspec.Struct, array_like=True, frozen=True, omit_defaults=True, gc=False):
    """New tokens of one request produced by one engine step.

    ``finish_reason`` set means this is the request's last message.
    ``token_ids`` never holds the EOS/stop token that ended the request.
    Trailing fields left at their defaults are not encoded (omit_defaults),
    so a delta without logprobs costs what it did before they existed.
    """

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    # Prompt tokens that the engine found in its prefix cache (first delta only).
    cached_prompt_tokens: int = 0
    error: str | None = None
    # Only for requests that asked (Generate.logprobs): one entry per token_ids
    # entry. logprobs[i]: log-probability of token_ids[i]; top_logprobs[i]:
    # (token id, logprob) of the k most likely tokens there, most likely first.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class StepOutputs(msgspec.Struct, tag=True, frozen=True, gc=False):
    """Everything one engine step produced for one frontend worker."""

    deltas: list[TokenDelta]


class RankStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One rank of a sharded engine, as its last report to rank 0 gave it."""

    rank: int
    host: str
    active_memory_bytes: int
    peak_memory_bytes: int


class GroupStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A sharded engine's group: how it is split and each rank's memory."""

    mode: Literal["tensor", "pipeline"]
    backend: Literal["ring", "jaccl", "nccl"]
    ranks: list[RankStatus]


class EngineStatus(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    query_id: str
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
    # None: one engine process, not a sharded group.
    group: GroupStatus | None = None
    # KV cache memory, counted as tokens x the whole model's bytes per token:
    # the budget of the batch and the prefix cache together, and what the
    # running rows reserve (prompt + max_tokens each, in the batch's padded
    # layout). The prefix cache's share is prompt_cache_bytes.
    kv_budget_bytes: int = 0
    kv_reserved_bytes: int = 0
    kv_bytes_per_token: int = 0
    # The quantized KV cache's bits (None: full precision) and group size.
    kv_bits: int | None = None
    kv_group_size: int = 0


class Pong(msgspec.Struct, tag=True, frozen=True, gc=False):
    """Also the engine's load, so workers can refuse work (429) before it queues."""

    nonce: int
    running_requests: int = 0
    queued_requests: int = 0


# ---------------------------------------------------------------- engine rank 0 -> other ranks


class StepPlan(msgspec.Struct, tag=True, frozen=True, kw_only=True, gc=False):
    """One engine step, decided by the scheduler and executed by every rank.

    Executing it depends on nothing else: the same plans on the same model
    give the same tokens. Order: remove ``aborts``, insert ``inserts``, then
    run ``decode_steps`` batch steps whose prefill takes at most
    ``prefill_rows`` rows, ``prefill_chunk`` prompt tokens each.
    """

    aborts: list[str] = []
    # Validated requests joining the batch, in order.
    inserts: list[Generate] = []
    # Rows the prefill batch may hold (those already prefilling: admit nobody new).
    prefill_rows: int
    prefill_chunk: int
    decode_steps: int = 1
    # mx.random's seed for this step: what unseeded sampling draws from
    # (seeded requests carry their own key).
    seed: int


class GroupPoll(msgspec.Struct, tag=True, frozen=True):
    """Every rank reports its memory (an all_gather right after this message).

    Rank 0 sends one about every second, busy or idle: it keeps the ranks'
    memory in the status fresh, and a rank that died or hangs shows at once.
    """


class GroupIdle(msgspec.Struct, tag=True, frozen=True):
    """Rank 0 has no work: the others may sleep briefly before waiting for its next message.

    A rank waiting inside a collective spins on its CPU; while rank 0 is idle
    it sends one of these every few tens of milliseconds, so the others sleep
    most of that time instead of spinning all of it.
    """


class GroupStop(msgspec.Struct, tag=True, frozen=True):
    """The group stops cleanly: every other rank exits 0."""


FrontendMessage = Hello | Generate | Arriving | Settled | Abort | StatusQuery | Ping
EngineMessage = Welcome | Rejected | StepOutputs | EngineStatus | Pong
GroupMessage = StepPlan | GroupPoll | GroupIdle | GroupStop
