"""Step plans: they cross the wire, and executing them depends on nothing else."""

from __future__ import annotations

import mlx.core as mx
import pytest

from engine.core import EngineCore, Scheduler, SchedulerConfig
from ipc import codec
from ipc.messages import Constraint, Generate, SamplingParams, StepPlan
from tests.unit import test_engine_core as core
from tests.unit.defaults import ENGINE_LIMITS
from tests.unit.test_engine_core import EOS, MAX_STEPS, VOCAB, gen, reference_greedy

CONFIG = SchedulerConfig(eos_token_ids=(EOS,), vocab_size=VOCAB, context_length=512, **ENGINE_LIMITS)
SHARED_PREFIX = list(range(5, 45))  # long enough for the prefix cache


@pytest.fixture(scope="module")
def model():
    return core.model.__wrapped__()  # the same seeded tiny llama as test_engine_core


def test_a_plan_round_trips_through_the_codec():
    plan = StepPlan(
        aborts=["gone"],
        inserts=[
            Generate(
                request_id="x",
                prompt_token_ids=[1, 2, 3],
                max_tokens=4,
                sampling=SamplingParams(temperature=0.7, top_p=0.9, logit_bias={3: -100.0}, seed=11),
                stop_token_ids=[],
                logprobs=2,
                constraint=Constraint(kind="json_schema", text='{"type": "object"}'),
            ),
            Generate(request_id="y", prompt_token_ids=[4], max_tokens=1),
        ],
        prefill_rows=8,
        prefill_chunk=128,
        decode_steps=2,
        seed=2**32 - 1,
    )
    assert codec.decode_step_plan(codec.encode(plan)) == plan


def requests() -> list[tuple[int, Generate]]:
    """(step to add it at, request): greedy, seeded, unseeded, biased, with
    logprobs, a shared prefix (cache hits), and one aborted mid-way."""
    return [
        (0, gen("greedy", SHARED_PREFIX + [50, 51], 12)),
        (0, gen("seeded", [5, 6, 7], 12, sampling=SamplingParams(temperature=1.0, seed=9))),
        (1, gen("unseeded", [8, 9, 10], 12, sampling=SamplingParams(temperature=1.0))),
        (1, gen("unseeded-top-p", [8, 9, 11], 12, sampling=SamplingParams(temperature=0.9, top_p=0.8))),
        (2, gen("biased", [12, 13], 8, sampling=SamplingParams(temperature=1.0, logit_bias={40: 5.0}))),
        (3, gen("logprobs", [14, 15, 16], 8, sampling=SamplingParams(temperature=1.0), logprobs=3)),
        (4, gen("aborted", [17, 18], 40, sampling=SamplingParams(temperature=1.0))),
        (20, gen("cached", SHARED_PREFIX + [60], 6, sampling=SamplingParams(temperature=1.0))),
    ]


def record(model) -> tuple[list[bytes], list[list]]:
    """Run the requests through a Scheduler; each step's encoded plan and its deltas."""
    s = Scheduler(model, CONFIG)
    pending = requests()
    plans, deltas = [], []
    for step in range(MAX_STEPS):
        while pending and pending[0][0] <= step:
            s.add(b"w", pending.pop(0)[1])
        if step == 8:
            s.abort(["aborted"])
        if not pending and not s.has_work():
            return plans, deltas
        plan = s.plan()
        if plan is None:
            continue
        plans.append(codec.encode(plan))
        deltas.append(s.core.execute(plan).deltas)
        s.core.remember_finished()
    raise AssertionError("scheduler did not go idle")


def replay(model, plans: list[bytes]) -> list[list]:
    c = EngineCore(model, CONFIG)
    out = []
    for data in plans:
        out.append(c.execute(codec.decode_step_plan(data)).deltas)
        c.remember_finished()
    return out


def test_replaying_the_plans_on_fresh_cores_gives_the_same_tokens(model):
    mx.random.seed(1)
    plans, deltas = record(model)
    # Another process's random state must not matter: each step's seed is in its plan.
    mx.random.seed(2)
    first = replay(model, plans)
    mx.random.seed(3)
    second = replay(model, plans)
    assert first == second == deltas
    finals = {d.request_id: d.finish_reason for step in deltas for d in step if d.finish_reason}
    assert finals["aborted"] == "abort" and finals["greedy"] == "length"
    assert any(d.cached_prompt_tokens for step in deltas for d in step if d.request_id == "cached")


def test_a_plan_can_run_several_decode_steps(model):
    c = EngineCore(model, CONFIG)
    prompt = [5, 6, 7]
    plan = StepPlan(inserts=[gen("r", prompt, 6)], prefill_rows=8, prefill_chunk=512, decode_steps=3, seed=0)
    per_plan = []
    for _ in range(MAX_STEPS):
        deltas = c.execute(plan).deltas
        per_plan.append([t for d in deltas for t in d.token_ids])
        if any(d.finish_reason for d in deltas):
            break
        plan = StepPlan(prefill_rows=8, prefill_chunk=512, decode_steps=3, seed=0)
    assert [t for tokens in per_plan for t in tokens] == reference_greedy(model, prompt, 6)
    assert max(len(tokens) for tokens in per_plan) == 3
