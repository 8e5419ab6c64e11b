"""Per-request samplers and logits processors built from wire SamplingParams.

Unseeded samplers are shared between requests with equal parameters: mlx-lm's
GenerationBatch samples the whole batch in one call when every row holds the
same sampler object, so sharing keeps the common case batched. They draw from
mx.random's global state, which every step plan seeds (so a seed per request
would split the batch's sampling into one call per row for nothing).

A request's ``logit_bias`` is added inside that shared sampler, not by a
logits processor: mlx-lm runs processors row by row in Python (a slice, the
processor and a concatenate per row per step; cost in BENCHMARKS.md), while
the sampler adds the bias to the whole batch in one op. The sampled tokens
are the same either way. Only the logprobs mlx-lm reports differ (they are
taken before the sampler), so a request that asks for logprobs keeps the
bias in a processor and its reported logprobs include the bias.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx
import msgspec
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
# A logit bias in hashable form: sorted (token id, bias) pairs.
BiasKey = tuple[tuple[int, float], ...]

# How many recent tokens the repetition/presence/frequency penalties look at
# (mlx-lm's default context size for each of them).
PENALTY_CONTEXT_TOKENS = 20
# Smallest top_p the sampler applies: far below any real nucleus, far above float32's zero.
MIN_TOP_P = 1e-9


class RequestSampling(NamedTuple):
    """What one request hands BatchGenerator: its sampler and its processors."""

    sampler: Sampler
    processors: list[LogitsProcessor] | None


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


def _bias_adder(bias: BiasKey, renormalize: bool) -> Callable[[mx.array], mx.array]:
    """Adds the bias to every row of a batch of logprobs, as mlx-lm's
    logit_bias processor does to logits. ``renormalize`` makes them logprobs
    again for the filters: top-p takes their exp, which a +100 bias would
    overflow in float32. Greedy and categorical sampling do not need it."""
    indices = mx.array([token for token, _ in bias])
    values = mx.array([value for _, value in bias])

    def add(logprobs: mx.array) -> mx.array:
        biased = logprobs.at[:, indices].add(values)
        if renormalize:
            biased = biased - mx.logsumexp(biased, axis=-1, keepdims=True)
        return biased

    return add


def _seeded_sampler(params: SamplingParams, seed: int, bias: BiasKey) -> Sampler:
    """A sampler with its own PRNG stream: the same seed gives the same tokens
    whatever else shares the batch (mx.random's global state would not)."""
    key = mx.random.key(seed)
    steps = _filters(params)
    if bias:
        steps.insert(0, _bias_adder(bias, renormalize=bool(steps)))
    inv_temp = 1.0 / params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, subkey = mx.random.split(key)
        for step in steps:
            logprobs = step(logprobs)
        return mx.random.categorical(logprobs * inv_temp, key=subkey)

    return sample


@lru_cache(maxsize=256)
def _shared_sampler(temperature: float, top_p: float, min_p: float, top_k: int, bias: BiasKey) -> Sampler:
    if temperature == 0:
        sampler: Sampler = greedy_sampler
    else:
        sampler = make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    if not bias:
        return sampler
    filtered = temperature != 0 and (0 < top_p < 1.0 or min_p != 0.0 or top_k > 0)
    add = _bias_adder(bias, renormalize=filtered)
    return lambda logprobs: sampler(add(logprobs))


def _bias_key(params: SamplingParams) -> BiasKey:
    return tuple(sorted(params.logit_bias.items())) if params.logit_bias else ()


def _sampler(params: SamplingParams, bias: BiasKey = ()) -> Sampler:
    if 0 < params.top_p < MIN_TOP_P:
        # float32 rounds it to 0, and apply_top_p would then drop every token.
        params = msgspec.structs.replace(params, top_p=MIN_TOP_P)
    if params.seed is not None and params.temperature != 0:
        return _seeded_sampler(params, params.seed, bias)
    return _shared_sampler(params.temperature, params.top_p, params.min_p, params.top_k, bias)


def _processors(params: SamplingParams, with_bias: bool = True) -> list[LogitsProcessor] | None:
    """Processors keep per-request state (token history), so never shared."""
    processors = make_logits_processors(
        logit_bias=(params.logit_bias or None) if with_bias else None,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=PENALTY_CONTEXT_TOKENS,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=PENALTY_CONTEXT_TOKENS,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=PENALTY_CONTEXT_TOKENS,
    )
    return processors or None


def build_request_sampling(params: SamplingParams, wants_logprobs: bool) -> RequestSampling:
    """The sampler and processors of one request; its logit bias goes in the
    sampler unless its logprobs are reported (see the module docstring)."""
    if wants_logprobs:
        return RequestSampling(_sampler(params), _processors(params))
    return RequestSampling(_sampler(params, _bias_key(params)), _processors(params, with_bias=False))
