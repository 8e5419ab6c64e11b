"""A sharded engine's group: rank 0's messages to the other ranks, and the watchdog.

Every rank of the group is started by mlx.launch (which sets MLX_RANK and
MLX_HOSTFILE) with the same config. Rank 0 plans each step and sends the
plan to the others; every rank executes it. The messages (ipc.messages'
GroupMessage) are msgpack bytes carried by mlx.distributed collectives: an
all_sum of a buffer that only rank 0 fills is a broadcast. They run on
mlx-lm's generation stream, the one the model's own collectives (tensor
all-reduces, pipeline sends) run on: collectives of two streams would
interleave on the same connections in a different order on each rank. Collectives are the only transport: no second network path to
set up, secure or keep alive.

The group lives and dies as one. A collective that fails (a peer process
died: the ring backend raises "connection to a peer was lost") ends the
rank with a non-zero exit, and the supervisor restarts the whole group. A
peer that hangs instead (stopped, swapping, a dead link that TCP has not
noticed yet) blocks the others inside a collective that never returns:
only another thread can see that, so a watchdog ends the process when a
wait on the group outlives its bound.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

from ipc import codec
from ipc.messages import GroupIdle, GroupPoll, GroupStatus, GroupStop, RankStatus, StepPlan
from ipc.runtime import DistributedBackend, DistributedConfig, DistributedMode

log = logging.getLogger(__name__)

# A rank first finishes the work it queued (settle: the model's forward runs
# asynchronously, its collectives included), then meets the others on a
# plan or poll broadcast. The ranks execute the same steps in lockstep
# (tensor mode all-reduces in every layer, pipeline mode passes
# activations; engine.follower allows for a pipeline's prefill), so a
# settled rank that waits longer than this on a broadcast or a poll is
# waiting for a rank that hangs.
GROUP_SYNC_TIMEOUT_S = 10.0
# One engine step (a decode step plus at most one prefill chunk) inside the
# group's collectives, until it has settled. Generous: the first steps of a
# big model build their kernels, and a prefill chunk of a large model over
# Ethernet takes seconds.
GROUP_STEP_TIMEOUT_S = 60.0
# A step that prefills gets this much longer per prompt token it may
# process (prefill as slow as 50 tokens/s: a big model on small Macs), so a
# long prefill is never taken for a hang, while decode steps keep the tight bound.
GROUP_STEP_S_PER_PROMPT_TOKEN = 0.02
# Once this many steps have run, the kernels of the usual shapes exist and a
# step gets the sync bound as its base instead: a rank that hangs in the
# middle of a decode step is then found within seconds, not a minute.
GROUP_WARM_UP_STEPS = 64
# A follower hears from rank 0 at least every housekeeping poll (about a
# second; every idle tick while idle) while rank 0 lives: silence this long
# means rank 0 hangs.
LEADER_SILENCE_LIMIT_S = GROUP_SYNC_TIMEOUT_S
# A follower asked to stop (SIGTERM) waits this long for rank 0's GroupStop,
# which the same signal to the whole group brings, before it leaves alone.
FOLLOWER_STOP_GRACE_S = GROUP_SYNC_TIMEOUT_S
# mlx's collectives spin while they wait, so a follower waiting for rank 0
# burns two cores. While idle, rank 0 sends GroupIdle every tick and the
# others sleep most of it, entering the next collective shortly before it.
# New work waits at most a tick for them.
GROUP_IDLE_TICK_S = 0.025
FOLLOWER_IDLE_SLEEP_S = 0.022
# How often the watchdog thread looks at its deadline and checks.
WATCHDOG_INTERVAL_S = 0.25
# A broadcast is one all_sum of this many bytes when the message fits (a
# step plan without long prompts does), two collectives otherwise.
HEAD_BYTES = 4096
_LENGTH_BYTES = 4
# Host names are gathered once, at start, in fixed-width fields.
HOSTNAME_BYTES = 256
# Exit status of a rank whose group failed (a peer lost or hung, a step
# that raised): the supervisor restarts the whole group.
EXIT_GROUP_FAILED = 1


class GroupError(RuntimeError):
    """The group cannot go on together (a collective failed, or it is not the size asked)."""


# ---------------------------------------------------------------- start


def join_group(config: DistributedConfig) -> Any:
    """This process's mlx.distributed group, checked against the config."""
    try:
        group = mx.distributed.init(strict=True, backend=config.backend)
    except (RuntimeError, ValueError) as exc:
        raise GroupError(f"cannot join the {config.backend} group: {exc}") from None
    if group.size() != config.ranks:
        raise GroupError(f"the group has {group.size()} ranks, the config says {config.ranks}")
    return group


# ---------------------------------------------------------------- transport


class Channel(Protocol):
    """What the group's messages travel on (a fake in unit tests)."""

    rank: int
    size: int

    def settle(self) -> None:
        """Wait until the work this rank queued (the model's collectives included) is done."""
        ...

    def broadcast(self, payload: bytes | None) -> bytes:
        """Rank 0 passes the bytes, every other rank None; all get rank 0's bytes."""
        ...

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (the same count on each), by rank."""
        ...


class CollectiveChannel:
    """Channel over mlx.distributed collectives, in stream order after the model's."""

    def __init__(self, group: Any) -> None:
        self._group = group
        self.rank: int = group.rank()
        self.size: int = group.size()

    def _all_sum(self, buffer: bytearray) -> bytes:
        """The element-wise sum of every rank's ``buffer`` (bytes, one per uint8)."""
        try:
            out = mx.distributed.all_sum(
                mx.array(np.frombuffer(buffer, dtype=np.uint8)), group=self._group, stream=generation_stream
            )
            mx.eval(out)
        except RuntimeError as exc:
            raise GroupError(f"collective failed: {exc}") from None
        return np.asarray(out).tobytes()

    def settle(self) -> None:
        try:
            mx.synchronize(generation_stream)
        except RuntimeError as exc:
            raise GroupError(f"collective failed: {exc}") from None

    def broadcast(self, payload: bytes | None) -> bytes:
        # The head carries the length and as much of the message as fits:
        # one collective per step for the usual plan.
        head = bytearray(HEAD_BYTES)
        if self.rank == 0:
            assert payload is not None
            head[:_LENGTH_BYTES] = len(payload).to_bytes(_LENGTH_BYTES, "little")
            inline = payload[: HEAD_BYTES - _LENGTH_BYTES]
            head[_LENGTH_BYTES : _LENGTH_BYTES + len(inline)] = inline
        got = self._all_sum(head)
        length = int.from_bytes(got[:_LENGTH_BYTES], "little")
        body = got[_LENGTH_BYTES : _LENGTH_BYTES + length]
        rest = length - len(body)
        if rest <= 0:
            return body
        tail = bytearray(rest)
        if self.rank == 0:
            assert payload is not None
            tail[:] = payload[len(body) :]
        return body + self._all_sum(tail)

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        try:
            out = mx.distributed.all_gather(
                mx.array(values, dtype=mx.int64), group=self._group, stream=generation_stream
            )
            mx.eval(out)
        except RuntimeError as exc:
            raise GroupError(f"collective failed: {exc}") from None
        flat: list[int] = out.tolist()  # type: ignore[assignment]
        n = len(values)
        return [flat[i * n : (i + 1) * n] for i in range(self.size)]


def settle(channel: Channel, watchdog: Watchdog) -> None:
    """Finish this rank's queued steps (bounded as a step) before a bounded meeting:
    the meeting's bound must not count the work still queued in front of it."""
    with watchdog.watch(GROUP_STEP_TIMEOUT_S, "finishing the last engine step"):
        channel.settle()


def step_timeout_s(plan: StepPlan, pending_prompt_tokens: int, steps_done: int) -> float:
    """The bound of executing ``plan`` when ``pending_prompt_tokens`` wait in the batch before it
    and the group has run ``steps_done`` steps (every rank counts the same plans)."""
    arriving = sum(len(r.prompt_token_ids) for r in plan.inserts)
    per_forward = min(pending_prompt_tokens + arriving, plan.prefill_rows * plan.prefill_chunk)
    base = GROUP_STEP_TIMEOUT_S if steps_done < GROUP_WARM_UP_STEPS else GROUP_SYNC_TIMEOUT_S
    return base + GROUP_STEP_S_PER_PROMPT_TOKEN * per_forward * plan.decode_steps


def gather_host_names(channel: Channel) -> list[str]:
    """Every rank's host name, by rank. Also the sync point after loading:
    no rank leaves it before every rank has its shard in memory."""
    name = socket.gethostname().encode()[:HOSTNAME_BYTES]
    padded = list(name.ljust(HOSTNAME_BYTES, b"\0"))
    rows = channel.gather_ints(padded)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in rows]


# ---------------------------------------------------------------- watchdog


class Watchdog:
    """Ends the process (``os._exit``) when a watched wait outlives its bound,
    or when a check names a reason. A thread: the main thread may be blocked
    inside a collective that never returns."""

    def __init__(self, exit_code: int = EXIT_GROUP_FAILED) -> None:
        self._exit_code = exit_code
        self._deadline: float | None = None
        self._what = ""
        self._limit_s = 0.0
        self._checks: list[Callable[[], str | None]] = []
        self._thread = threading.Thread(target=self._run, name="group-watchdog", daemon=True)

    def add_check(self, check: Callable[[], str | None]) -> None:
        """``check()`` returns a reason to exit, or None; called from the watchdog thread."""
        self._checks.append(check)

    def start(self) -> None:
        self._thread.start()

    def rearm(self, seconds: float, what: str) -> None:
        """Give the block being watched ``seconds`` from now instead (its own bound until it ends)."""
        self._deadline, self._what, self._limit_s = time.monotonic() + seconds, what, seconds

    @contextmanager
    def watch(self, seconds: float, what: str) -> Iterator[None]:
        """Exit the process unless the block ends within ``seconds``; nests (an inner bound replaces the outer one while it runs)."""
        saved = self._deadline, self._what, self._limit_s
        self._deadline, self._what, self._limit_s = time.monotonic() + seconds, what, seconds
        try:
            yield
        finally:
            self._deadline, self._what, self._limit_s = saved

    def _run(self) -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._exit(f"{self._what} did not finish within {self._limit_s:g} s: a rank of the group hangs")
            for check in self._checks:
                reason = check()
                if reason is not None:
                    self._exit(reason)

    def _exit(self, reason: str) -> None:
        log.error("%s; exiting", reason)
        if log.isEnabledFor(logging.DEBUG):
            # Where the main thread waits (a collective inside a step, a poll...).
            faulthandler.dump_traceback(all_threads=True)
        os._exit(self._exit_code)


# ---------------------------------------------------------------- rank 0


class GroupLink:
    """Rank 0's end of the group: plans, polls and the stop, each under the watchdog."""

    def __init__(
        self,
        channel: Channel,
        watchdog: Watchdog,
        mode: DistributedMode,
        backend: DistributedBackend,
        hosts: list[str],
        pending_prompt_tokens: Callable[[], int],
    ) -> None:
        self._channel = channel
        # Rank 0's batch: how much prompt the next step may prefill (its bound).
        self._pending_prompt_tokens = pending_prompt_tokens
        self._watchdog = watchdog
        self._mode = mode
        self._backend = backend
        self._hosts = hosts
        self.status = GroupStatus(mode=mode, backend=backend, ranks=[])
        self._last_sent = time.monotonic()
        self._steps = 0  # plans sent: the followers count the same

    def _send(self, message: StepPlan | GroupPoll | GroupIdle | GroupStop, what: str) -> None:
        settle(self._channel, self._watchdog)
        with self._watchdog.watch(GROUP_SYNC_TIMEOUT_S, what):
            self._channel.broadcast(codec.encode(message))
        self._last_sent = time.monotonic()

    def idle(self) -> None:
        """Rank 0 has no work: let the others sleep (at most once a tick)."""
        if time.monotonic() - self._last_sent >= GROUP_IDLE_TICK_S:
            self._send(GroupIdle(), "an idle tick")

    def send_plan(self, plan: StepPlan) -> None:
        """The Scheduler's plan sink: every rank executes the plan rank 0 is about to,
        within the same bound (inside ``step()``)."""
        self._send(plan, "sending a step plan")
        bound_s = step_timeout_s(plan, self._pending_prompt_tokens(), self._steps)
        self._steps += 1
        self._watchdog.rearm(bound_s, "an engine step")

    @contextmanager
    def step(self) -> Iterator[None]:
        """Bounds one engine step: its plan's broadcast, then its execution (send_plan sets that bound)."""
        with self._watchdog.watch(GROUP_STEP_TIMEOUT_S, "an engine step"):
            yield

    def poll(self, memory: tuple[int, int]) -> GroupStatus:
        """Every rank's memory (``memory``: rank 0's active and peak bytes)."""
        self._send(GroupPoll(), "a group poll")
        with self._watchdog.watch(GROUP_SYNC_TIMEOUT_S, "gathering the ranks' memory"):
            rows = self._channel.gather_ints(list(memory))
        self.status = GroupStatus(
            mode=self._mode,
            backend=self._backend,
            ranks=[
                RankStatus(rank=r, host=self._hosts[r], active_memory_bytes=active, peak_memory_bytes=peak)
                for r, (active, peak) in enumerate(rows)
            ],
        )
        return self.status

    def stop(self) -> None:
        """Every other rank exits 0."""
        self._send(GroupStop(), "stopping the group")
