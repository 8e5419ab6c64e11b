"""The loop of every rank but 0 in a sharded engine: execute what rank 0 sends.

A follower owns its shard of the model and an EngineCore like rank 0's; it
has no socket and decides nothing. Each step plan is executed exactly as
rank 0 executes it (the deltas are rank 0's to send, so they are dropped
here), and the finished sequences go into the prefix cache at the same point
of the sequence of calls as on rank 0, so both caches make the same choices.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from engine.group import (
    FOLLOWER_IDLE_SLEEP_S,
    FOLLOWER_STOP_GRACE_S,
    GROUP_SYNC_TIMEOUT_S,
    LEADER_SILENCE_LIMIT_S,
    Channel,
    Watchdog,
    settle,
    step_timeout_s,
)
from ipc import codec
from ipc.messages import GroupIdle, GroupPoll, GroupStop, StepPlan

log = logging.getLogger(__name__)


class Core(Protocol):
    """What a follower needs of engine.core.EngineCore."""

    def execute(self, plan: StepPlan) -> Any: ...

    def pending_prompt_tokens(self) -> int: ...

    def remember_finished(self) -> None: ...

    def memory(self) -> tuple[int, int]: ...


class Follower:
    def __init__(
        self, core: Core, channel: Channel, watchdog: Watchdog, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._core = core
        self._sleep = sleep
        self._channel = channel
        self._watchdog = watchdog
        self._stopped = False
        self._parent_pid = os.getppid()
        self._term_at: float | None = None
        # How long rank 0 may stay silent before its next message.
        self._wait_s = LEADER_SILENCE_LIMIT_S
        self.steps = 0
        self._handlers: dict[type, Callable[[Any], None]] = {
            StepPlan: self._on_plan,
            GroupPoll: self._on_poll,
            GroupIdle: self._on_idle,
            GroupStop: self._on_stop,
        }
        watchdog.add_check(self._stop_overdue)
        watchdog.add_check(self._parent_gone)

    # ------------------------------------------------------------------ control

    def request_stop(self, *_: object) -> None:
        """Signal handler: only record. The follower is blocked in a collective
        most of the time; it stops on rank 0's GroupStop (the same signal reaches
        rank 0) or, when none comes, the watchdog ends it after a grace period."""
        if self._term_at is None:
            self._term_at = time.monotonic()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _stop_overdue(self) -> str | None:
        if self._term_at is not None and time.monotonic() - self._term_at > FOLLOWER_STOP_GRACE_S:
            return f"asked to stop, and rank 0 sent no stop within {FOLLOWER_STOP_GRACE_S:.0f} s"
        return None

    def _parent_gone(self) -> str | None:
        # Reparenting means whoever started us (mlx.launch) died: don't hold the shard's memory.
        return "parent process exited" if os.getppid() != self._parent_pid else None

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        """Follow until rank 0 sends GroupStop; a failed collective or step raises."""
        log.info("following rank 0 (pid %d)", os.getpid())
        while not self._stopped:
            settle(self._channel, self._watchdog)
            with self._watchdog.watch(self._wait_s, "waiting for rank 0"):
                data = self._channel.broadcast(None)
            message = codec.decode_group_message(data)
            self._handlers[type(message)](message)
        log.info("follower stopped")

    def _on_plan(self, plan: StepPlan) -> None:
        bound_s = step_timeout_s(plan, self._core.pending_prompt_tokens(), self.steps)
        with self._watchdog.watch(bound_s, "an engine step"):
            self._core.execute(plan)
            # Rank 0 calls this once the step's deltas are out, before its next plan.
            self._core.remember_finished()
        self.steps += 1
        # Ranks are not in lockstep through a prefill in pipeline mode: a stage
        # is done with its layers when it has sent their output on, and rank 0
        # (the last stage) may still have the rest of the step to run.
        self._wait_s = bound_s + LEADER_SILENCE_LIMIT_S

    def _on_poll(self, _: GroupPoll) -> None:
        self._wait_s = LEADER_SILENCE_LIMIT_S
        with self._watchdog.watch(GROUP_SYNC_TIMEOUT_S, "reporting memory to rank 0"):
            self._channel.gather_ints(list(self._core.memory()))

    def _on_idle(self, _: GroupIdle) -> None:
        # Rank 0's next message is about a tick away: sleep instead of spinning in the collective.
        self._wait_s = LEADER_SILENCE_LIMIT_S
        self._sleep(FOLLOWER_IDLE_SLEEP_S)

    def _on_stop(self, _: GroupStop) -> None:
        self._stopped = True
