"""A sharded engine's control messages and the follower loop, over a fake channel (no processes)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from engine.core import EngineCore, Scheduler, SchedulerConfig
from engine.follower import Follower
from engine.group import (
    EXIT_GROUP_FAILED,
    FOLLOWER_IDLE_SLEEP_S,
    GROUP_IDLE_TICK_S,
    GROUP_STEP_S_PER_PROMPT_TOKEN,
    GROUP_STEP_TIMEOUT_S,
    GROUP_SYNC_TIMEOUT_S,
    GROUP_WARM_UP_STEPS,
    GroupError,
    GroupLink,
    Watchdog,
    step_timeout_s,
)
from engine.proc import EngineLoop
from ipc import codec
from ipc.messages import GroupIdle, GroupPoll, GroupStatus, GroupStop, ModelInfo, RankStatus, SamplingParams, StepPlan
from ipc.sockets import default_ipc_address, make_private_runtime_dir
from tests.unit import test_engine_core as core
from tests.unit.defaults import ENGINE_LIMITS
from tests.unit.test_engine_core import EOS, MAX_STEPS, VOCAB, gen

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = SchedulerConfig(eos_token_ids=(EOS,), vocab_size=VOCAB, context_length=512, **ENGINE_LIMITS)
SHARED_PREFIX = list(range(5, 45))  # long enough for the prefix cache


class Rank0Channel:
    """Rank 0's side: keeps what it broadcast; every gather answers with ``peer_rows``."""

    rank = 0
    size = 2

    def __init__(self, peer_rows: list[int] | None = None) -> None:
        self.sent: list[bytes] = []
        self.peer_rows = peer_rows or [0, 0]

    def settle(self) -> None:
        pass  # nothing runs asynchronously here

    def broadcast(self, payload: bytes | None) -> bytes:
        assert payload is not None
        self.sent.append(payload)
        return payload

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        return [values, self.peer_rows]


class FollowerChannel:
    """A follower's side: receives the given messages in order; records its gathers."""

    rank = 1
    size = 2

    def __init__(self, messages: list[bytes]) -> None:
        self.inbox = deque(messages)
        self.gathered: list[list[int]] = []

    def settle(self) -> None:
        pass  # nothing runs asynchronously here

    def broadcast(self, payload: bytes | None) -> bytes:
        assert payload is None, "a follower never sends"
        return self.inbox.popleft()  # an empty inbox (no GroupStop) fails the test

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        self.gathered.append(values)
        return [[0, 0], values]


class RecordingCore:
    """An EngineCore whose calls (and deltas) are recorded in order."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.deltas: list[list] = []

    def execute(self, plan: StepPlan) -> Any:
        self.calls.append("execute")
        if self.inner is None:
            return None
        result = self.inner.execute(plan)
        self.deltas.append(result.deltas)
        return result

    def remember_finished(self) -> None:
        self.calls.append("remember_finished")
        if self.inner is not None:
            self.inner.remember_finished()

    def pending_prompt_tokens(self) -> int:
        return 0 if self.inner is None else self.inner.pending_prompt_tokens()

    def memory(self) -> tuple[int, int]:
        self.calls.append("memory")
        return (111, 222)


@pytest.fixture(scope="module")
def model():
    return core.model.__wrapped__()  # the same seeded tiny llama as test_engine_core


def test_control_messages_round_trip_through_the_codec():
    plan = StepPlan(aborts=["a"], inserts=[gen("x", [1, 2], 3)], prefill_rows=4, prefill_chunk=64, seed=7)
    for message in (plan, GroupPoll(), GroupIdle(), GroupStop()):
        assert codec.decode_group_message(codec.encode(message)) == message


def test_follower_dispatches_plans_polls_and_the_stop():
    plan = StepPlan(prefill_rows=1, prefill_chunk=8, seed=0)
    messages = [codec.encode(m) for m in (plan, GroupPoll(), GroupIdle(), plan, GroupStop())]
    channel = FollowerChannel(messages)
    fake = RecordingCore()
    slept: list[float] = []
    follower = Follower(fake, channel, Watchdog(), sleep=slept.append)
    follower.run()
    assert slept == [FOLLOWER_IDLE_SLEEP_S]  # rank 0 idle: sleep instead of spinning in the next collective
    # Each plan is followed by remember_finished, as rank 0 does after sending the step's deltas.
    assert fake.calls == ["execute", "remember_finished", "memory", "execute", "remember_finished"]
    assert channel.gathered == [[111, 222]]
    assert follower.steps == 2 and not channel.inbox


def test_rank_0_poll_reports_every_rank_by_host():
    channel = Rank0Channel(peer_rows=[5, 6])
    link = GroupLink(channel, Watchdog(), "pipeline", "ring", ["mac-a", "mac-b"], lambda: 0)
    status = link.poll((3, 4))
    assert codec.decode_group_message(channel.sent[-1]) == GroupPoll()
    assert (
        status
        == link.status
        == GroupStatus(
            mode="pipeline",
            backend="ring",
            ranks=[
                RankStatus(rank=0, host="mac-a", active_memory_bytes=3, peak_memory_bytes=4),
                RankStatus(rank=1, host="mac-b", active_memory_bytes=5, peak_memory_bytes=6),
            ],
        )
    )
    link.stop()
    assert codec.decode_group_message(channel.sent[-1]) == GroupStop()


def test_idle_rank_0_ticks_at_most_once_a_tick():
    channel = Rank0Channel()
    link = GroupLink(channel, Watchdog(), "tensor", "ring", ["h0", "h1"], lambda: 0)
    link.poll((0, 0))
    link.idle()  # right after the poll: the followers are not waiting long yet
    assert [codec.decode_group_message(m) for m in channel.sent] == [GroupPoll()]
    time.sleep(GROUP_IDLE_TICK_S)
    link.idle()
    assert codec.decode_group_message(channel.sent[-1]) == GroupIdle()


def test_a_follower_fed_rank_0s_messages_produces_rank_0s_tokens(model):
    """Rank 0's scheduler hands each plan to the link before executing it; a
    follower that executes what the link sent ends with the same deltas
    (sampling seeded per request and per step, prefix cache hits included)."""
    channel = Rank0Channel()
    link = GroupLink(
        channel, Watchdog(), "tensor", "ring", ["h0", "h1"], lambda: scheduler.core.pending_prompt_tokens()
    )
    scheduler = Scheduler(model, CONFIG, plan_sink=link.send_plan)
    arrivals = {
        0: [gen("greedy", SHARED_PREFIX + [50], 10), gen("seeded", [5, 6], 10, sampling=SamplingParams(seed=3))],
        2: [gen("unseeded", [7, 8, 9], 10, sampling=SamplingParams(temperature=1.0))],
        15: [gen("cached", SHARED_PREFIX + [51], 5, sampling=SamplingParams(temperature=1.0))],
    }
    rank0_deltas = []
    for step in range(MAX_STEPS):
        for request in arrivals.pop(step, []):
            scheduler.add(b"w", request)
        if step % 4 == 0:
            link.poll(scheduler.memory())
        if not arrivals and not scheduler.has_work():
            break
        outputs = scheduler.step()
        rank0_deltas.extend(d for deltas in outputs.values() for d in deltas)
        scheduler.remember_finished()
    else:
        raise AssertionError("scheduler did not go idle")
    link.stop()

    mx.random.seed(12345)  # the follower's own random state must not matter
    follower_core = RecordingCore(EngineCore(model, CONFIG))
    Follower(follower_core, FollowerChannel(channel.sent), Watchdog()).run()
    assert [d for step in follower_core.deltas for d in step] == rank0_deltas
    assert any(d.cached_prompt_tokens for d in rank0_deltas if d.request_id == "cached")


WATCHDOG_SCRIPT = """
import sys, time
from engine.group import Watchdog
w = Watchdog()
w.start()
if sys.argv[1] == "bound":
    with w.watch(0.3, "a test wait"):
        time.sleep(30)
else:
    w.add_check(lambda: "a test check failed")
    time.sleep(30)
"""


@pytest.mark.parametrize("cause", ["bound", "check"])
def test_the_watchdog_ends_a_process_stuck_past_its_bound_or_failing_a_check(cause):
    """The main thread may be blocked in a collective forever: the watchdog's thread exits the process."""
    done = subprocess.run(
        [sys.executable, "-c", WATCHDOG_SCRIPT, cause], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == EXIT_GROUP_FAILED
    expected = "a test wait did not finish within 0.3 s" if cause == "bound" else "a test check failed"
    assert expected in done.stderr


class FailingLink:
    """Rank 0's link when a follower is gone: the next plan's broadcast fails."""

    status = GroupStatus(mode="tensor", backend="ring", ranks=[])

    def __init__(self) -> None:
        self.polls = 0

    def step(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def poll(self, memory: tuple[int, int]) -> GroupStatus:
        self.polls += 1
        return self.status

    def send_plan(self, plan: StepPlan) -> None:
        raise GroupError("collective failed: [ring] connection to a peer was lost")


def test_a_failed_step_in_a_group_ends_rank_0s_loop_instead_of_failing_the_requests(model):
    """One process fails the batch's requests and goes on; a group's ranks no longer
    agree, so rank 0's loop ends (closing its socket) and the supervisor restarts the group."""
    link = FailingLink()
    scheduler = Scheduler(model, CONFIG, plan_sink=link.send_plan)
    info = ModelInfo(
        model_id="tiny", model_path="/nowhere", adapter_path=None, context_length=512,
        eos_token_ids=[EOS], vocab_size=VOCAB, created=0,
    )  # fmt: skip
    loop = EngineLoop(scheduler, info, default_ipc_address(make_private_runtime_dir()), group=link)  # type: ignore[arg-type]
    scheduler.add(b"w", gen("doomed", [5, 6, 7], 4))
    with pytest.raises(GroupError, match="connection to a peer was lost"):
        loop.run()
    assert link.polls == 1  # housekeeping polled the group before the step


def test_a_step_that_prefills_gets_a_longer_bound_than_a_decode_step():
    decode = StepPlan(prefill_rows=0, prefill_chunk=512, seed=0)
    assert step_timeout_s(decode, pending_prompt_tokens=0, steps_done=0) == GROUP_STEP_TIMEOUT_S
    burst = StepPlan(inserts=[gen("a", [1] * 3000, 1)], prefill_rows=8, prefill_chunk=512, seed=0)
    # At most one forward's tokens count (8 rows x 512), not the whole prompt.
    assert (
        step_timeout_s(burst, pending_prompt_tokens=2000, steps_done=0)
        == GROUP_STEP_TIMEOUT_S + 4096 * GROUP_STEP_S_PER_PROMPT_TOKEN
    )


def test_a_warm_group_bounds_a_decode_step_by_seconds():
    """After the first steps (kernels built), a rank that hangs mid-step is found within the sync bound."""
    decode = StepPlan(prefill_rows=0, prefill_chunk=512, seed=0)
    assert step_timeout_s(decode, 0, steps_done=GROUP_WARM_UP_STEPS - 1) == GROUP_STEP_TIMEOUT_S
    assert step_timeout_s(decode, 0, steps_done=GROUP_WARM_UP_STEPS) == GROUP_SYNC_TIMEOUT_S < GROUP_STEP_TIMEOUT_S


def test_the_batch_counts_the_prompt_tokens_still_to_prefill(model):
    c = EngineCore(model, CONFIG)
    first = StepPlan(inserts=[gen("a", list(range(5, 105)), 4)], prefill_rows=1, prefill_chunk=30, seed=0)
    c.execute(first)
    # One 30-token chunk of the 100-token prompt went through.
    assert c.pending_prompt_tokens() == 70
    for _ in range(MAX_STEPS):
        if c.pending_prompt_tokens() == 0:
            break
        c.execute(StepPlan(prefill_rows=1, prefill_chunk=30, seed=0))
    assert c.pending_prompt_tokens() == 0
