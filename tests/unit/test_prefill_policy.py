"""engine.prefill: the cost fit, admission holding and chunk sizes (no model)."""

from __future__ import annotations

import pytest

from engine.prefill import (
    ADMISSION_HOLD_MAX_S,
    ANNOUNCEMENT_EXPIRY_S,
    BUSY_PREFILL_MIN_TOKENS,
    BUSY_PREFILL_SHARE,
    PREFILL_FORWARD_TOKENS,
    WHOLE_PREFILL_MAX_STEPS,
    Announcements,
    LinearCost,
    PrefillPolicy,
)


def test_fit_separates_fixed_and_per_token_costs():
    cost = LinearCost()
    for tokens in (64, 512, 128, 1024, 256, 32) * 5:
        cost.add(tokens, 0.010 + 2e-5 * tokens)
    fixed, per_token = cost.fit()
    assert fixed == pytest.approx(0.010, rel=1e-6)
    assert per_token == pytest.approx(2e-5, rel=1e-6)


def test_fit_without_spread_is_proportional():
    cost = LinearCost()
    assert cost.fit() is None
    for _ in range(4):
        cost.add(256, 0.004)
    assert cost.fit() == (0.0, pytest.approx(0.004 / 256))


def test_fit_follows_a_change_of_costs():
    cost = LinearCost()
    for tokens in (64, 512) * 10:
        cost.add(tokens, 0.001 + 1e-5 * tokens)
    for tokens in (64, 512) * 30:
        cost.add(tokens, 0.020 + 1e-5 * tokens)
    fixed, _ = cost.fit()
    assert fixed == pytest.approx(0.020, rel=0.01)


# Prompt tokens left in a prefill far longer than a few decode steps.
LONG = 100_000


def busy_step(p: PrefillPolicy, decode_s: float, tokens: int, chunk_s: float) -> None:
    """A step that decoded and prefilled, as BatchGenerator times it: the decode
    forward was queued by the step before, so the decode timer finds its tokens
    nearly ready and the prefill timer waits for that forward, then the chunk."""
    p.learn(1, 0.05 * decode_s, tokens, 0.95 * decode_s + chunk_s, decoding_rows=8)


def policy(decode_s: float, fixed: float, per_token: float, max_chunk: int = 512) -> PrefillPolicy:
    p = PrefillPolicy(max_chunk=max_chunk)
    for tokens in (32, 256, 64, 512):
        p.learn(1, decode_s, 0, 0.0, decoding_rows=8)  # a decode-only step
        busy_step(p, decode_s, tokens, fixed + per_token * tokens)
    return p


def test_a_chunk_beside_decoding_is_charged_without_the_decode_forward():
    p = policy(0.010, 0.002, 1e-5)
    fixed, per_token = p.prefill.fit()
    assert fixed == pytest.approx(0.002, rel=1e-6)
    assert per_token == pytest.approx(1e-5, rel=1e-6)


def test_a_chunk_with_nothing_decoding_is_charged_its_own_time():
    p = PrefillPolicy(max_chunk=512)
    for tokens in (32, 256, 64, 512):
        p.learn(0, 0.0, tokens, 0.001 + 2e-5 * tokens, decoding_rows=0)
    assert p.prefill.fit() == (pytest.approx(0.001, rel=1e-6), pytest.approx(2e-5, rel=1e-6))


def test_chunk_is_full_when_nothing_decodes_or_nothing_is_known():
    assert PrefillPolicy(512).chunk(rows=1, decoding_rows=8, tokens_left=LONG) == 512
    assert policy(0.010, 0.0, 1e-4).chunk(rows=1, decoding_rows=0, tokens_left=LONG) == 512


def test_many_rows_share_the_forward_token_cap():
    p = PrefillPolicy(max_chunk=512)
    assert p.chunk(rows=8, decoding_rows=0, tokens_left=LONG) == 512
    assert p.chunk(rows=64, decoding_rows=0, tokens_left=LONG) == PREFILL_FORWARD_TOKENS // 64
    assert p.chunk(rows=1024, decoding_rows=0, tokens_left=LONG) == PREFILL_FORWARD_TOKENS // 1024


def test_chunk_costs_about_a_share_of_a_decode_step():
    # 10 ms decode, no fixed cost, 0.1 ms/token: the share of 10 ms buys (share * 100) tokens, split over the rows.
    p = policy(0.010, 0.0, 1e-4)
    budget = round(BUSY_PREFILL_SHARE * 100)
    assert p.chunk(rows=1, decoding_rows=8, tokens_left=LONG) == pytest.approx(budget, abs=1)
    assert p.chunk(rows=2, decoding_rows=8, tokens_left=LONG) == pytest.approx(budget / 2, abs=1)
    assert p.chunk(rows=budget, decoding_rows=budget + 1, tokens_left=LONG) == BUSY_PREFILL_MIN_TOKENS


def test_chunks_shrink_as_a_long_prompts_context_grows():
    # Each chunk costs more per token than the last (attention over a longer
    # context): the next chunk follows the latest forward's cost, not the average.
    p = policy(0.010, 0.0, 1e-4)
    budget_s = BUSY_PREFILL_SHARE * 0.010
    busy_step(p, 0.010, 20, 20 * 2e-4)  # 0.2 ms/token now
    assert p.chunk(rows=1, decoding_rows=8, tokens_left=LONG) == pytest.approx(budget_s / 2e-4, abs=1)
    before = p.chunk(rows=1, decoding_rows=8, tokens_left=LONG)
    busy_step(p, 0.010, 20, 20 * 2e-3)  # 2 ms/token
    assert BUSY_PREFILL_MIN_TOKENS <= p.chunk(rows=1, decoding_rows=8, tokens_left=LONG) < before


def test_chunks_keep_a_floor():
    # 2 ms/token: the share of a 10 ms decode step buys 2 tokens; the floor holds.
    assert policy(0.010, 0.0, 2e-3).chunk(rows=1, decoding_rows=8, tokens_left=LONG) == BUSY_PREFILL_MIN_TOKENS


def test_chunk_grows_when_the_fixed_cost_dominates():
    # A GPU: 12 ms decode, 30 ms fixed per prefill forward, 5 us/token. No chunk
    # can cost under a decode step, so each forward carries at least as much
    # token work as fixed cost (6,000 tokens), capped by the step size.
    p = policy(0.012, 0.030, 5e-6, max_chunk=4096)
    assert p.chunk(rows=1, decoding_rows=8, tokens_left=LONG) == 4096
    assert p.chunk(rows=4, decoding_rows=8, tokens_left=LONG) == pytest.approx(1500, abs=2)


def test_prompts_as_many_as_the_streams_go_in_full_chunks():
    # The rest of a burst behind its first arrivals: their first tokens come
    # before the few running streams' smoothness.
    p = policy(0.010, 0.0, 1e-4)
    budget = BUSY_PREFILL_SHARE * 100
    assert p.chunk(rows=8, decoding_rows=8, tokens_left=8 * 4000) == 512
    assert p.chunk(rows=63, decoding_rows=1, tokens_left=63 * 4000) == PREFILL_FORWARD_TOKENS // 63
    # One long prompt among many streams keeps the share.
    assert p.chunk(rows=1, decoding_rows=16, tokens_left=4000) == pytest.approx(budget, abs=1)


def test_a_prefill_of_a_few_decode_steps_goes_whole():
    # 10 ms decode, no fixed cost, 0.1 ms/token: 4 steps buy 400 tokens in all.
    p = policy(0.010, 0.0, 1e-4)
    whole = int(WHOLE_PREFILL_MAX_STEPS * 100)
    assert p.chunk(rows=13, decoding_rows=19, tokens_left=whole) == 512
    assert p.chunk(rows=13, decoding_rows=19, tokens_left=whole + 13) == BUSY_PREFILL_MIN_TOKENS


def test_a_burst_tail_is_sized_against_the_batch_that_decodes_beside_it():
    # A CPU: 2.5 ms a step at 2 rows, 7.25 ms at 40; prefill 1 ms fixed, 20 us/token.
    p = PrefillPolicy(max_chunk=512)
    for rows in (2, 40, 2, 40, 2, 40):
        p.learn(1, 0.0025 + 0.000125 * (rows - 2), 0, 0.0, decoding_rows=rows)
        p.learn(0, 0.0, 1000, 0.001 + 2e-5 * 1000, decoding_rows=0)
    assert p.decode_step_s(2) == pytest.approx(0.0025, rel=1e-3)
    assert p.decode_step_s(40) == pytest.approx(0.00725, rel=1e-3)
    # 25 prompts of 45 tokens behind 40 streams that just started: 23.5 ms in all,
    # within 4 steps of the 40-row batch (29 ms), though not of a 2-row one (10 ms).
    assert p.chunk(rows=25, decoding_rows=40, tokens_left=25 * 45) == 512


def test_a_decode_cost_seen_at_one_batch_size_is_taken_as_flat():
    p = PrefillPolicy(max_chunk=512)
    p.learn(1, 0.010, 0, 0.0, decoding_rows=8)
    assert p.decode_step_s(1) == p.decode_step_s(64) == pytest.approx(0.010)


def test_an_idle_engine_admits_what_came_at_once_and_a_busy_one_holds_while_arrivals_come_between_steps():
    p = PrefillPolicy(512)
    assert p.admit(now=0.0, waiting=1, free_rows=8, arrived_since_last_step=1, busy=False)
    assert p.hold_left(0.0) == 0.0
    assert not p.admit(now=0.1, waiting=2, free_rows=8, arrived_since_last_step=2, busy=True)
    assert p.hold_left(0.1) == 0.0  # rows run: the loop steps, it does not wait
    assert p.admit(now=0.101, waiting=2, free_rows=8, arrived_since_last_step=0, busy=True)


def test_announced_requests_hold_what_came_until_they_come_or_the_bound():
    p = PrefillPolicy(512)
    assert not p.admit(now=0.0, waiting=1, free_rows=8, arrived_since_last_step=1, busy=False, announced=2)
    # Nothing else to run: the loop may wait for the rest of the bound (a message wakes it).
    assert p.hold_left(0.01) == pytest.approx(ADMISSION_HOLD_MAX_S - 0.01)
    assert not p.admit(now=0.01, waiting=2, free_rows=8, arrived_since_last_step=1, busy=False, announced=1)
    assert p.admit(now=0.02, waiting=3, free_rows=8, arrived_since_last_step=1, busy=False, announced=0)
    # Never past the bound, however many stay announced.
    assert not p.admit(now=1.0, waiting=1, free_rows=8, arrived_since_last_step=1, busy=True, announced=5)
    assert p.admit(
        now=1.0 + ADMISSION_HOLD_MAX_S, waiting=1, free_rows=8, arrived_since_last_step=0, busy=True, announced=5
    )
    # A full prefill batch is not held for more.
    assert p.admit(now=2.0, waiting=8, free_rows=8, arrived_since_last_step=8, busy=False, announced=3)


def test_announcements_count_what_is_on_its_way_in_any_order_and_expire():
    a = Announcements()
    a.arriving(b"w1", 0, now=0.0)
    a.arriving(b"w1", 1, now=0.0)
    a.arriving(b"w2", 0, now=0.0)
    assert a.pending(0.0) == 3
    a.settled(b"w1", 1, now=0.001)
    assert a.pending(0.001) == 2
    a.settled(b"w2", 1, now=0.001)  # overtook its Arriving (two sockets)
    a.arriving(b"w2", 1, now=0.002)  # ... which then cancels nothing more
    assert a.pending(0.002) == 2
    a.drop(b"w2")  # the worker went away
    assert a.pending(0.002) == 1
    # Never settled (its handler killed): it stops counting after a while.
    assert a.pending(ANNOUNCEMENT_EXPIRY_S / 2) == 1
    assert a.pending(ANNOUNCEMENT_EXPIRY_S + 0.001) == 0


def test_nothing_held_nothing_to_wait_for():
    p = PrefillPolicy(512)
    assert p.hold_left(0.0) == 0.0
    assert p.admit(now=0.0, waiting=0, free_rows=8, arrived_since_last_step=0, busy=False)
    assert p.hold_left(0.0) == 0.0


def test_a_hold_never_waits_past_its_bound():
    p = PrefillPolicy(512)
    now = 0.0
    for i in range(100):
        now = i * 0.001
        if p.admit(now=now, waiting=1 + i, free_rows=1000, arrived_since_last_step=1, busy=False, announced=1):
            break
        assert 0 < p.hold_left(now) <= ADMISSION_HOLD_MAX_S - now + 1e-12
    assert ADMISSION_HOLD_MAX_S <= now < ADMISSION_HOLD_MAX_S + 0.001


def test_a_burst_is_held_while_it_arrives_then_admitted_together():
    p = PrefillPolicy(512)
    assert not p.admit(now=0.000, waiting=2, free_rows=8, arrived_since_last_step=2, busy=True)
    assert not p.admit(now=0.010, waiting=5, free_rows=8, arrived_since_last_step=3, busy=True)
    # Arrivals stopped: go.
    assert p.admit(now=0.020, waiting=5, free_rows=8, arrived_since_last_step=0, busy=True)


def test_a_full_prefill_batch_is_admitted_at_once():
    p = PrefillPolicy(512)
    assert p.admit(now=0.0, waiting=8, free_rows=8, arrived_since_last_step=8, busy=True)


def test_holding_is_bounded_in_time():
    p = PrefillPolicy(512)
    assert not p.admit(now=10.0, waiting=1, free_rows=8, arrived_since_last_step=1, busy=True)
    assert not p.admit(
        now=10.0 + ADMISSION_HOLD_MAX_S / 2, waiting=2, free_rows=8, arrived_since_last_step=1, busy=True
    )
    assert p.admit(now=10.0 + ADMISSION_HOLD_MAX_S, waiting=3, free_rows=8, arrived_since_last_step=1, busy=True)
    # The clock starts again with the next hold.
    assert not p.admit(now=20.0, waiting=1, free_rows=8, arrived_since_last_step=1, busy=True)
