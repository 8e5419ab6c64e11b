"""Per-request samplers and logits processors built from wire SamplingParams.

Unseeded samplers are shared between requests with equal parameters: mlx-lm's
GenerationBatch samples the whole batch in one call when every row holds the
same sampler object, so sharing keeps the common case batched.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
    make_sampler,
)

from ipc.messages import SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# How many recent tokens the repetition/presence/frequency penalties look at
# (mlx-lm's default context size for each of them).
PENALTY_CONTEXT_TOKENS = 20


def _filters(params: SamplingParams) -> list[Callable[[mx.array], mx.array]]:
    """The truncation steps of mlx-lm's make_sampler, in its order."""
    steps: list[Callable[[mx.array], mx.array]] = []
    if 0 < params.top_p < 1.0:
        steps.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p != 0.0:
        steps.append(lambda x: apply_min_p(x, params.min_p, 1))
    if params.top_k > 0:
        steps.append(lambda x: apply_top_k(x, params.top_k))
    return steps


def _seeded_sampler(params: SamplingParams) -> Sampler:
    """A sampler with its own PRNG stream: the same seed gives the same tokens
    whatever else shares the batch (mx.random's global state would not)."""
    key = mx.random.key(params.seed)
    steps = _filters(params)
    inv_temp = 1.0 / params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, subkey = mx.random.split(key)
        for step in steps:
            logprobs = step(logprobs)
        return mx.random.categorical(logprobs * inv_temp, key=subkey)

    return sample


@lru_cache(maxsize=256)
def _shared_sampler(temperature: float, top_p: float, min_p: float, top_k: int) -> Sampler:
    return make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)


def build_sampler(params: SamplingParams) -> Sampler:
    if params.temperature == 0:
        return greedy_sampler
    if params.seed is not None:
        return _seeded_sampler(params)
    return _shared_sampler(params.temperature, params.top_p, params.min_p, params.top_k)


def build_logits_processors(params: SamplingParams) -> Optional[list[LogitsProcessor]]:
    """Processors keep per-request state (token history), so never shared."""
    processors = make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=PENALTY_CONTEXT_TOKENS,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=PENALTY_CONTEXT_TOKENS,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=PENALTY_CONTEXT_TOKENS,
    )
    return processors or None
