"""Scheduler over the real BatchGenerator, on a tiny random llama, no sockets."""

from __future__ import annotations

import logging

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from engine.core import MIN_PREFIX_REUSE_TOKENS, Scheduler, SchedulerConfig
from engine.prefill import ADMISSION_HOLD_MAX_S, BUSY_PREFILL_MIN_TOKENS
from engine.sampling import build_request_sampling
from ipc.messages import Generate, SamplingParams
from tests.unit.defaults import ENGINE_LIMITS
from tests.unit.random_llama import random_llama

# Steps here are counted: arrivals are admitted at the next step, not after a moment of quiet.

VOCAB = 300
EOS = 1
GREEDY = SamplingParams(temperature=0.0)
MAX_STEPS = 500  # every loop below is bounded


@pytest.fixture(scope="module")
def model():
    return random_llama(vocab=VOCAB)


def make_scheduler(model, **overrides) -> Scheduler:
    config = dict(eos_token_ids=(EOS,), vocab_size=VOCAB, context_length=512, **ENGINE_LIMITS)
    config.update(overrides)
    return Scheduler(model, SchedulerConfig(**config))


def gen(rid: str, prompt: list[int], max_tokens: int = 8, **kw) -> Generate:
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("stop_token_ids", [])
    return Generate(request_id=rid, prompt_token_ids=prompt, max_tokens=max_tokens, **kw)


def run_to_end(s: Scheduler) -> dict[str, dict]:
    """Step until idle, as the socket loop does (deltas out, then finished
    prefixes remembered); collect tokens and the final delta of every request."""
    results: dict[str, dict] = {}
    for _ in range(MAX_STEPS):
        if not s.has_work():
            return results
        for worker, deltas in s.step().items():
            for d in deltas:
                r = results.setdefault(d.request_id, {"tokens": [], "finals": [], "worker": worker})
                r["tokens"] += d.token_ids
                if d.finish_reason:
                    r["finals"].append(d)
        s.remember_finished()
    raise AssertionError("scheduler did not go idle")


def step_planned(s: Scheduler, outputs: list | None = None):
    """One step, as Scheduler.step takes it; its plan (its outputs appended to ``outputs``)."""
    plan = s.plan()
    out = s.collect(s.core.execute(plan) if plan is not None else None)
    if outputs is not None:
        outputs.append(out)
    return plan


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = []
    for (tok, _), _ in zip(generate_step(mx.array(prompt), model), range(n)):
        out.append(int(tok))
    return out


def test_batch_matches_single_stream_greedy(model):
    s = make_scheduler(model)
    prompts = {f"r{i}": list(range(5 + i, 30 + 2 * i)) for i in range(4)}
    for rid, p in prompts.items():
        s.add(b"w1", gen(rid, p, 12))
    results = run_to_end(s)
    for rid, p in prompts.items():
        assert results[rid]["tokens"] == reference_greedy(model, p, 12)
        assert [f.finish_reason for f in results[rid]["finals"]] == ["length"]


def test_request_joins_a_running_batch(model):
    s = make_scheduler(model)
    s.add(b"w", gen("first", list(range(5, 25)), 20))
    early = []
    for _ in range(MAX_STEPS):
        early += [t for d in s.step().get(b"w", []) for t in d.token_ids]
        if len(early) >= 5:
            break
    s.add(b"w", gen("late", list(range(40, 60)), 6))
    results = run_to_end(s)
    assert results["late"]["tokens"] == reference_greedy(model, list(range(40, 60)), 6)
    # The late request ran while "first" was still decoding.
    assert len(results["first"]["tokens"]) > len(results["late"]["tokens"])
    assert early + results["first"]["tokens"] == reference_greedy(model, list(range(5, 25)), 20)


def tokens_of(outputs: dict, request_id: str) -> list[int]:
    return [t for deltas in outputs.values() for d in deltas if d.request_id == request_id for t in d.token_ids]


def test_a_burst_gets_its_first_tokens_with_its_prefill_step(model):
    # mlx-lm's BatchGenerator returns them two steps later: it queues the last
    # prompt token's forward only at the start of the step after the prefill,
    # and returns its token from the step after that.
    s = make_scheduler(model)
    prompts = {f"r{i}": list(range(5 + i, 30 + 2 * i)) for i in range(3)}
    for rid, p in prompts.items():
        s.add(b"w", gen(rid, p, 6))
    prefill_step = s.step()
    rows = s.core.batch.rows()
    assert (rows.prefilling, rows.decoding) == (0, 3)  # decoding from the prefill step on
    second_step = s.step()
    results = run_to_end(s)
    for rid, p in prompts.items():
        reference = reference_greedy(model, p, 6)
        assert tokens_of(prefill_step, rid) == reference[:1]
        # Every token once: the step after returns what BatchGenerator computed
        # since, the first token not again.
        assert tokens_of(prefill_step, rid) + tokens_of(second_step, rid) + results[rid]["tokens"] == reference
        assert [f.finish_reason for f in results[rid]["finals"]] == ["length"]


def test_a_first_token_that_ends_its_request_comes_once_with_its_finish(model):
    # Counted and checked against the stop tokens by BatchGenerator, a step later.
    prompt = list(range(5, 30))
    first = reference_greedy(model, prompt, 1)
    s = make_scheduler(model)
    s.add(b"w", gen("one", prompt, 1))
    s.add(b"w", gen("stopped", prompt, 8, stop_token_ids=first))
    results = run_to_end(s)
    assert results["one"]["tokens"] == first
    assert [f.finish_reason for f in results["one"]["finals"]] == ["length"]
    assert results["stopped"]["tokens"] == []  # a stop token is never text
    assert [f.finish_reason for f in results["stopped"]["finals"]] == ["stop"]


def test_a_request_aborted_after_its_first_token_ends_once(model):
    s = make_scheduler(model)
    prompt = list(range(5, 30))
    s.add(b"w", gen("x", prompt, 8))
    assert tokens_of(s.step(), "x") == reference_greedy(model, prompt, 1)
    s.abort(["x"])
    r = run_to_end(s)["x"]
    assert r["tokens"] == []
    assert [f.finish_reason for f in r["finals"]] == ["abort"]
    assert s.running == 0 and not s.has_work()


def test_a_request_joining_a_busy_batch_gets_its_first_token_with_its_prefill_step(model):
    s = make_scheduler(model)
    s.add(b"w", gen("running", [5, 6, 7], 30))
    running = []
    for _ in range(3):
        running += tokens_of(s.step(), "running")
    late_prompt = list(range(40, 60))
    s.add(b"w", gen("late", late_prompt, 6))
    late: list[int] = []
    for _ in range(MAX_STEPS):
        before = s.core.batch.rows()
        outputs = s.step()
        running += tokens_of(outputs, "running")
        late += tokens_of(outputs, "late")
        if late:
            break
    # The step that returned its first token began with it still to prefill
    # (held while it had just come, then one chunk).
    assert before.decoding == 1 and before.waiting + before.prefilling == 1
    assert len(late) == 1
    results = run_to_end(s)
    assert late + results["late"]["tokens"] == reference_greedy(model, late_prompt, 6)
    assert running + results["running"]["tokens"] == reference_greedy(model, [5, 6, 7], 30)


def test_outputs_grouped_per_worker_one_list_per_step(model):
    s = make_scheduler(model)
    s.add(b"a", gen("a1", [5, 6, 7], 4))
    s.add(b"a", gen("a2", [8, 9, 10], 4))
    s.add(b"b", gen("b1", [11, 12], 4))
    seen_workers = set()
    for _ in range(MAX_STEPS):
        if not s.has_work():
            break
        out = s.step()
        for worker, deltas in out.items():
            seen_workers.add(worker)
            assert len({d.request_id for d in deltas}) == len(deltas)
            owner = {"a1": b"a", "a2": b"a", "b1": b"b"}
            assert all(owner[d.request_id] == worker for d in deltas)
    assert seen_workers == {b"a", b"b"}


def test_eos_stops_and_is_not_sent(model):
    s = make_scheduler(model)
    prompt = list(range(5, 40))
    seeded = SamplingParams(temperature=1.0, seed=7)
    s.add(b"w", gen("free", prompt, 30, sampling=seeded))
    first = run_to_end(s)["free"]["tokens"]
    # Declare the first token not seen before a stop token: the same seeded run ends there.
    k = next(i for i in range(1, 30) if first[i] not in first[:i])
    s.add(b"w", gen("r", prompt, 40, sampling=seeded, stop_token_ids=[first[k]]))
    r = run_to_end(s)["r"]
    assert r["tokens"] == first[:k]
    assert r["finals"][0].finish_reason == "stop"


def test_abort_is_final_once_and_idempotent(model):
    s = make_scheduler(model)
    s.add(b"w", gen("x", list(range(5, 20)), 50))
    s.step()
    s.abort(["x"])
    s.abort(["x", "never-existed"])
    r = run_to_end(s)["x"]
    assert [f.finish_reason for f in r["finals"]] == ["abort"]
    assert s.running == 0 and not s.has_work()


def test_drop_worker_frees_its_slots_only(model):
    s = make_scheduler(model)
    s.add(b"gone", gen("g", list(range(5, 20)), 50))
    s.add(b"stay", gen("s", list(range(5, 20)), 5))
    s.step()
    s.drop_worker(b"gone")
    results = run_to_end(s)
    assert results["s"]["finals"][0].finish_reason == "length"
    assert "g" not in results or all(f.finish_reason == "abort" for f in results["g"]["finals"])
    assert s.running == 0


@pytest.mark.parametrize(
    "request_, reason, message",
    [
        (gen("e1", [], 5), "error", "empty prompt"),
        (gen("e2", [VOCAB + 5], 5), "error", "token ids"),
        # A limit no load lifts: the client's to shorten (HTTP 400).
        (gen("e3", [5] * 500, 100), "too_large", "context length"),
    ],
)
def test_invalid_requests_end_with_one_error(model, request_, reason, message):
    s = make_scheduler(model)
    s.add(b"w", request_)
    r = run_to_end(s)[request_.request_id]
    assert len(r["finals"]) == 1 and r["finals"][0].finish_reason == reason
    assert message in r["finals"][0].error


def test_seeded_sampling_is_reproducible_inside_a_batch(model):
    s = make_scheduler(model)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    s.add(b"w", gen("s1", [5, 6, 7], 10, sampling=seeded))
    s.add(b"w", gen("noise", [9, 9, 9], 10, sampling=SamplingParams(temperature=1.0)))
    first = run_to_end(s)["s1"]["tokens"]
    s.add(b"w", gen("s2", [5, 6, 7], 10, sampling=seeded))
    assert run_to_end(s)["s2"]["tokens"] == first


def test_prefix_cache_hit_reuses_prompt(model):
    s = make_scheduler(model)
    prompt = list(range(5, 200))
    s.add(b"w", gen("a", prompt, 4))
    a = run_to_end(s)["a"]
    s.add(b"w", gen("b", prompt + [7, 8], 4))
    b = run_to_end(s)["b"]
    assert s.stats.prompt_cache_hits == 1
    assert b["finals"][0].cached_prompt_tokens == 0  # reported on the first delta only
    assert b["tokens"] == reference_greedy(model, prompt + [7, 8], 4)
    assert a["tokens"] == reference_greedy(model, prompt, 4)
    assert s.prefix_cache_entries >= 1


def test_a_cached_sequence_longer_than_the_shared_prefix_is_trimmed_back(model):
    s = make_scheduler(model)
    s.add(b"w", gen("a", list(range(5, 200)), 4))
    run_to_end(s)
    prompt = list(range(5, 100)) + [250, 251]
    s.add(b"w", gen("b", prompt, 4))
    b = run_to_end(s)["b"]
    assert s.stats.prompt_cache_hit_tokens == 95
    assert b["tokens"] == reference_greedy(model, prompt, 4)


def test_finished_prefixes_are_remembered_after_the_step_returns(model):
    s = make_scheduler(model)
    prompt = list(range(5, 100))
    s.add(b"w", gen("a", prompt, 2))
    for _ in range(MAX_STEPS):
        if any(d.finish_reason for ds in s.step().values() for d in ds):
            break
    # The final delta is out before any prefix-cache work...
    assert s.prefix_cache_entries == 0
    # ...and a request added before remember_finished still sees the prefix.
    s.add(b"w", gen("b", prompt + [7], 2))
    s.step()
    assert s.prefix_cache_entries == 1 and s.stats.prompt_cache_hits == 1


def test_prefix_cache_disabled_with_zero_bytes(model):
    s = make_scheduler(model, prompt_cache_bytes=0)
    s.add(b"w", gen("a", list(range(5, 50)), 3))
    run_to_end(s)
    s.add(b"w", gen("b", list(range(5, 50)), 3))
    run_to_end(s)
    assert s.stats.prompt_cache_hits == 0 and s.prefix_cache_entries == 0


def test_logit_bias_forces_a_token(model):
    s = make_scheduler(model)
    sampling = SamplingParams(temperature=0.0, logit_bias={42: 100.0})
    s.add(b"w", gen("b", [5, 6, 7], 5, sampling=sampling))
    assert run_to_end(s)["b"]["tokens"] == [42] * 5


BAN_GREEDY_PATH = {t: -100.0 for t in range(2, 40)}
BIASED = [
    SamplingParams(temperature=0.0, logit_bias=BAN_GREEDY_PATH),
    SamplingParams(temperature=0.8, top_p=0.5, seed=3, logit_bias=BAN_GREEDY_PATH),
    SamplingParams(temperature=0.8, min_p=0.2, top_k=5, seed=4, logit_bias={60: 3.0, 61: -2.5}),
    # +100 on unnormalized logprobs would overflow top-p's exp in float32.
    SamplingParams(temperature=1.0, top_p=0.95, seed=5, logit_bias={t: 100.0 for t in range(60, 68)}),
]


@pytest.mark.parametrize("sampling", BIASED, ids=["greedy", "top_p", "min_p_top_k", "top_p_plus_100"])
def test_logit_bias_in_the_sampler_samples_what_the_processor_does(model, sampling):
    # Without logprobs the bias is added in the batch's sampler; with them, by
    # mlx-lm's per-row processor. Same tokens either way, beside a plain row.
    s = make_scheduler(model)
    s.add(b"w", gen("sampler", [5, 6, 7], 12, sampling=sampling))
    s.add(b"w", gen("processor", [5, 6, 7], 12, sampling=sampling, logprobs=0))
    s.add(b"w", gen("plain", [5, 6, 7], 12))
    results = run_to_end(s)
    assert results["sampler"]["tokens"] == results["processor"]["tokens"]
    assert results["sampler"]["tokens"] != results["plain"]["tokens"]
    if sampling.temperature == 0:
        assert not set(results["sampler"]["tokens"]) & set(BAN_GREEDY_PATH)


def test_rows_with_equal_bias_share_one_sampler_and_no_processor():
    # One shared sampler object is what lets mlx-lm sample the batch in one call.
    params = SamplingParams(temperature=0.0, logit_bias={3: -100.0, 9: 5.0})
    a = build_request_sampling(params, wants_logprobs=False)
    b = build_request_sampling(SamplingParams(temperature=0.0, logit_bias={9: 5.0, 3: -100.0}), wants_logprobs=False)
    other = build_request_sampling(SamplingParams(temperature=0.0, logit_bias={3: -99.0}), wants_logprobs=False)
    assert a.sampler is b.sampler and a.sampler is not other.sampler
    assert a.processors is None
    penalised = build_request_sampling(
        SamplingParams(temperature=0.0, logit_bias={3: 1.0}, repetition_penalty=1.3), wants_logprobs=False
    )
    assert len(penalised.processors) == 1  # the penalty only
    reported = build_request_sampling(params, wants_logprobs=True)
    assert len(reported.processors) == 1  # the bias, so reported logprobs include it


@pytest.mark.parametrize("token", [-1, VOCAB])
def test_logit_bias_outside_the_vocabulary_ends_that_request_only(model, token):
    s = make_scheduler(model)
    s.add(b"w", gen("bad", [5, 6], 3, sampling=SamplingParams(temperature=0.0, logit_bias={token: 1.0})))
    s.add(b"w", gen("good", [5, 6], 3))
    results = run_to_end(s)
    assert results["bad"]["finals"][0].finish_reason == "error"
    assert "logit_bias" in results["bad"]["finals"][0].error
    assert results["good"]["finals"][0].finish_reason == "length"


def test_failed_step_fails_requests_and_recovers(model):
    s = make_scheduler(model)
    s.add(b"w", gen("doomed", [5, 6, 7], 5))
    s.fail_all("boom")
    r = run_to_end(s)["doomed"]
    assert r["finals"][0].finish_reason == "error" and r["finals"][0].error == "boom"
    s.add(b"w", gen("after", [5, 6, 7], 3))
    assert run_to_end(s)["after"]["finals"][0].finish_reason == "length"


def test_unexpected_insert_failure_ends_that_request_only(model):
    s = make_scheduler(model)

    class Exploding(SamplingParams, frozen=True):
        @property
        def temperature(self):  # type: ignore[override]
            raise RuntimeError("sampler construction failed")

    s.add(b"w", gen("bad", [5, 6], 3, sampling=Exploding()))
    s.add(b"w", gen("good", [5, 6], 3))
    results = run_to_end(s)
    assert results["bad"]["finals"][0].finish_reason == "error"
    assert "sampler construction failed" in results["bad"]["finals"][0].error
    assert results["good"]["finals"][0].finish_reason == "length"


def test_prefix_cache_entries_do_not_pin_the_batch_buffers(model):
    """Engine memory at idle = the weights + what the prefix cache says it holds."""
    s = make_scheduler(model)
    run_to_end(s)
    baseline = mx.get_active_memory()
    for round_ in range(3):
        for i in range(16):
            s.add(b"w", gen(f"{round_}-{i}", list(range(5, 30 + i)), 20 + i))
        run_to_end(s)
    held = mx.get_active_memory() - baseline
    assert s.prefix_cache_bytes > 0
    assert held <= 2 * s.prefix_cache_bytes + (1 << 20), (held, s.prefix_cache_bytes)


def test_a_failing_logits_processor_ends_only_its_request(model):
    """Fault injection through the constructor-only seam: the batch goes on."""

    def inject(request):
        if request.request_id != "victim":
            return None
        calls = {"n": 0}

        def explode(tokens, logits):
            calls["n"] += 1
            if calls["n"] == 3:
                raise MemoryError("injected allocation failure")
            return logits

        return explode

    s = Scheduler(
        model,
        SchedulerConfig(eos_token_ids=(EOS,), vocab_size=VOCAB, context_length=512, **ENGINE_LIMITS),
        fault_injector=inject,
    )
    prompts = {"victim": [5, 6, 7], "a": list(range(5, 25)), "b": list(range(30, 50))}
    for rid, p in prompts.items():
        s.add(b"w", gen(rid, p, 10))
    results = run_to_end(s)
    victim = results["victim"]["finals"]
    assert [f.finish_reason for f in victim] == ["error"] and "injected allocation failure" in victim[0].error
    for rid in ("a", "b"):
        assert results[rid]["tokens"] == reference_greedy(model, prompts[rid], 10)
    assert s.running == 0


def test_full_queue_refuses_with_overloaded(model):
    s = make_scheduler(model, max_queued_requests=2)
    for i in range(3):
        s.add(b"w", gen(f"q{i}", [5, 6, 7], 4))
    results = run_to_end(s)
    assert results["q2"]["finals"][0].finish_reason == "overloaded"
    assert [results[f"q{i}"]["finals"][0].finish_reason for i in range(2)] == ["length", "length"]


def test_prefill_chunks_shrink_while_streams_decode(model, monkeypatch):
    # On this tiny model the whole prompt costs a few decode steps: it would go in whole.
    monkeypatch.setattr("engine.prefill.WHOLE_PREFILL_MAX_STEPS", 0.0)
    long_prompt = list(range(5, 250)) * 2  # 490 tokens
    s = make_scheduler(model, prefill_step_size=256)
    s.add(b"w", gen("long", long_prompt, 2))
    assert step_planned(s).prefill_chunk == 256  # nothing decoding: full chunks
    assert run_to_end(s)["long"]["tokens"] == reference_greedy(model, long_prompt, 2)
    # More streams decode than prompts wait: the prompt is chunked.
    s.add(b"w", gen("streaming", [5, 6, 7], 300))
    s.add(b"w", gen("streaming too", [5, 6, 8], 300))
    for _ in range(5):
        s.step()
    s.add(b"w", gen("arrives", long_prompt, 2))
    sizes = []
    for _ in range(200):
        if not s.queued:
            break
        sizes.append(step_planned(s).prefill_chunk)
    # Sized from measured costs while a stream decodes: smaller, never tiny.
    assert sizes and all(BUSY_PREFILL_MIN_TOKENS <= n <= 256 for n in sizes) and min(sizes) < 256
    results = run_to_end(s)
    assert results["arrives"]["tokens"] == reference_greedy(model, long_prompt, 2)


def test_a_burst_arriving_over_steps_is_prefilled_together(model, monkeypatch):
    monkeypatch.setattr("engine.prefill.ADMISSION_HOLD_MAX_S", 600.0)  # no clock in this test
    s = make_scheduler(model, prefill_batch_size=8)
    s.add(b"w", gen("running", [5, 6, 7], 40))
    early = []
    for _ in range(3):
        early += [t for d in s.step()[b"w"] for t in d.token_ids]
    prompts = {f"b{i}": [9 + i, 10, 11, 12] for i in range(6)}
    rows_seen = []
    for _i, (rid, prompt) in enumerate(prompts.items()):
        s.add(b"w", gen(rid, prompt, 6))
        early += [t for d in s.step()[b"w"] if d.request_id == "running" for t in d.token_ids]
        # One arrival per step: held while more keep coming.
        rows = s.core.batch.rows()
        rows_seen.append(rows.prefilling + rows.decoding)
    assert rows_seen[:-1] == [1] * (len(prompts) - 1)  # only "running" so far
    results = run_to_end(s)
    for rid, prompt in prompts.items():
        assert results[rid]["tokens"] == reference_greedy(model, prompt, 6)
    assert early + results["running"]["tokens"] == reference_greedy(model, [5, 6, 7], 40)


def test_an_engine_holds_what_came_while_announced_requests_are_on_their_way(model):
    s = make_scheduler(model, prefill_batch_size=8)
    s.arriving(b"w1", 0)
    s.arriving(b"w2", 0)  # another worker's, still being parsed
    s.add(b"w1", gen("first", [9, 10, 11], 6))
    s.settled(b"w1", 0)
    assert step_planned(s).prefill_rows == 0  # w2's request is on its way
    assert 0 < s.wait_s() <= ADMISSION_HOLD_MAX_S  # the loop waits on its socket, not spinning
    s.add(b"w2", gen("second", [12, 13, 14], 6))
    s.settled(b"w2", 0)
    prefilled: list = []
    assert step_planned(s, prefilled).prefill_rows > 0
    rows = s.core.batch.rows()
    assert rows.prefilling + rows.decoding == 2  # one prefill batch for both
    results = run_to_end(s)
    for rid, prompt in (("first", [9, 10, 11]), ("second", [12, 13, 14])):
        assert tokens_of(prefilled[0], rid) + results[rid]["tokens"] == reference_greedy(model, prompt, 6)


def test_a_gone_workers_announcements_hold_nothing(model):
    s = make_scheduler(model, prefill_batch_size=8)
    s.arriving(b"gone", 0)
    s.drop_worker(b"gone")
    s.add(b"w", gen("r", [9, 10, 11], 2))
    assert step_planned(s).prefill_rows > 0


def test_each_step_is_one_debug_line(model, caplog):
    s = make_scheduler(model)
    s.add(b"w", gen("r", [5, 6, 7], 2))
    with caplog.at_level(logging.DEBUG, logger="engine.core"):
        s.step()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert "+1 inserted" in line and "took" in line


def test_held_requests_can_be_aborted(model, monkeypatch):
    monkeypatch.setattr("engine.prefill.ADMISSION_HOLD_MAX_S", 600.0)
    s = make_scheduler(model)
    s.add(b"w", gen("running", [5, 6, 7], 30))
    s.step()
    s.add(b"w", gen("held", [8, 9], 5))
    s.step()
    assert s.queued == 1
    s.abort(["held"])
    results = run_to_end(s)
    assert [f.finish_reason for f in results["held"]["finals"]] == ["abort"]
    assert s.running == 0 and s.queued == 0


def test_short_shared_prefixes_are_not_reused(model):
    s = make_scheduler(model)
    s.add(b"w", gen("a", list(range(5, 200)), 3))
    run_to_end(s)
    short = list(range(5, 5 + MIN_PREFIX_REUSE_TOKENS - 1)) + [290, 291, 292]
    s.add(b"w", gen("b", short, 3))
    b = run_to_end(s)["b"]
    assert s.stats.prompt_cache_hits == 0
    assert b["tokens"] == reference_greedy(model, short, 3)


def test_decode_batch_never_exceeds_max_batch_size(model):
    s = make_scheduler(model, max_batch_size=2, prefill_batch_size=8)
    for i in range(5):
        s.add(b"w", gen(f"r{i}", [5 + i, 6, 7], 6))
    sizes = []
    for _ in range(MAX_STEPS):
        if not s.has_work():
            break
        s.step()
        rows = s.core.batch.rows()
        sizes.append(rows.prefilling + rows.decoding)
    assert max(sizes) == 2
    assert s.stats.requests_finished == 5


@pytest.mark.parametrize("seed", [None, 3])
def test_a_top_p_that_float32_rounds_to_zero_keeps_the_top_token(seed):
    """top_p = 5e-324 (valid JSON, > 0) is 0 in float32; it must still sample the likeliest token."""
    logprobs = mx.log(mx.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    sampler = build_request_sampling(SamplingParams(top_p=5e-324, seed=seed), wants_logprobs=False).sampler
    for _ in range(20):
        assert sampler(logprobs).tolist() == [1, 0]
