"""Engine steps over mlx-lm's BatchGenerator: planned, then executed (no sockets here).

The Scheduler decides. ``add`` and ``abort`` may be called between steps;
``plan`` turns what arrived, what was aborted and the batch's load into a
StepPlan, the one place where clocks (admission hold, prefill costs) count
and where arrivals wait for KV memory (engine.kv_budget).
The EngineCore executes a plan: aborts, inserts, prefill settings, batch
steps, and the deltas they produce. Executing depends only on the plan, so
another rank that executes the same plans produces the same tokens.
``Scheduler.step`` does both and groups the deltas by the frontend worker
that owns each request, so the socket loop sends one message per worker.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import StopSequences

from engine.batch_adapter import Batch, BatchRows, StepCosts
from engine.constraints import ConstraintError, GrammarCompiler, GrammarProcessor
from engine.kv_budget import KvLedger
from engine.kv_memory import model_bytes_per_token, resolve_budget
from engine.prefill import Announcements, PrefillPolicy
from engine.prefix_cache import PrefixCache
from engine.sampling import RequestSampling, build_request_sampling
from ipc.messages import LOGPROB_FLOOR, FinishReason, Generate, StepPlan, TokenDelta

log = logging.getLogger(__name__)

WorkerId = bytes
Outputs = dict[WorkerId, list[TokenDelta]]

# Entry count cap of the prefix cache; the byte cap is the real limit.
PREFIX_CACHE_MAX_ENTRIES = 256
# A shorter cached prefix (a chat template's opening, a first word) is not
# reused: copying it out costs about what prefilling it would, and unequal
# cached lengths push the prefill batch onto mlx-lm's slow padded path
# (BENCHMARKS.md, "Measurements behind the defaults").
MIN_PREFIX_REUSE_TOKENS = 32
# Most top logprobs a request may ask for per token (OpenAI's chat limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SchedulerConfig:
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    context_length: int
    # The limits of ipc.runtime.EngineConfig (their defaults live in deploy/settings.py).
    max_batch_size: int
    prefill_batch_size: int
    prefill_step_size: int
    prompt_cache_bytes: int
    # Requests waiting for a batch slot (or in prefill) beyond this are refused.
    max_queued_requests: int
    # KV memory of the batch and the prefix cache together; 0: derived from
    # the device's memory and the loaded model (engine.kv_memory.derive_budget).
    kv_cache_budget_bytes: int
    # None: full-precision KV cache; else its bits and quantization group size.
    kv_bits: int | None
    kv_group_size: int


@dataclass
class _Active:
    request_id: str
    uid: int
    cached_prompt_tokens: int
    first_sent: bool = False
    # None: no logprobs wanted; k: sampled logprob plus the top k.
    logprobs: int | None = None
    grammar: GrammarProcessor | None = None


@dataclass
class EngineStats:
    started_at: float = field(default_factory=time.monotonic)
    tokens_generated: int = 0
    prompt_tokens_processed: int = 0
    requests_finished: int = 0
    prompt_cache_hits: int = 0
    prompt_cache_hit_tokens: int = 0


class RequestRejected(ValueError):
    """A request the engine cannot run; it ends with an error delta."""


class Overloaded(RequestRejected):
    """The queue is full: the request ends with finish_reason "overloaded" (HTTP 429)."""


class TooLarge(RequestRejected):
    """The request exceeds a limit of this engine whatever its load (the context
    length, the KV budget): it ends with finish_reason "too_large" (HTTP 400)."""


@dataclass
class StepResult:
    """What executing one plan produced: deltas in order, and what it cost."""

    deltas: list[TokenDelta]
    costs: StepCosts


# Where the Scheduler hands each plan before executing it: a sharded engine's
# rank 0 sends it to the other ranks (engine.group.GroupLink.send_plan).
PlanSink = Callable[[StepPlan], None]


def _no_sink(plan: StepPlan) -> None:
    """One engine process: nobody else executes the plans."""


# Test-only seam (never reachable from settings or the wire): given a request,
# an extra logits processor to run for it, e.g. one that raises.
FaultInjector = Callable[[Generate], Callable[[Any, Any], Any] | None]


class _Guarded:
    """Runs one request's logits processors; an exception marks that request
    failed instead of failing the whole batch's step."""

    def __init__(self, processors: list[Any], failures: dict[int, str]) -> None:
        self.processors = processors
        self.failures = failures
        self.uid = -1  # set once BatchGenerator has assigned it

    def __call__(self, tokens: Any, logits: Any) -> Any:
        try:
            for processor in self.processors:
                logits = processor(tokens, logits)
        except Exception as exc:
            log.exception("a logits processor failed for uid %d", self.uid)
            self.failures[self.uid] = f"{type(exc).__name__}: {exc}"
        return logits


class EngineCore:
    """Executes step plans: owns the batch, the prefix cache and the requests in them."""

    def __init__(
        self,
        model: Any,
        config: SchedulerConfig,
        grammars: GrammarCompiler | None = None,
        fault_injector: FaultInjector | None = None,
    ) -> None:
        self._config = config
        self._grammars = grammars  # None: constrained requests are refused
        self._fault_injector = fault_injector
        # mlx-lm would let a prefill batch larger than the decode batch grow the
        # decode batch past max_batch_size: prefill rows never exceed it here.
        self.batch = Batch(
            model,
            config.eos_token_ids,
            max_rows=config.max_batch_size,
            prefill_rows=min(config.prefill_batch_size, config.max_batch_size),
            prefill_chunk=config.prefill_step_size,
            kv_bits=config.kv_bits,
            kv_group_size=config.kv_group_size,
        )
        self._default_stops = StopSequences([[t] for t in config.eos_token_ids])
        bytes_per_token = model_bytes_per_token(model, config.kv_bits, config.kv_group_size)
        self.kv = KvLedger(bytes_per_token, resolve_budget(config.kv_cache_budget_bytes, bytes_per_token))
        self._prefix_cache = PrefixCache(
            max(config.prompt_cache_bytes, 0), PREFIX_CACHE_MAX_ENTRIES, bytes_per_token, MIN_PREFIX_REUSE_TOKENS
        )
        self._by_uid: dict[int, _Active] = {}
        self._by_id: dict[str, _Active] = {}
        # uid -> error, filled by _Guarded during a step.
        self._failures: dict[int, str] = {}
        # Finished sequences' tokens and caches, kept for the prefix cache once
        # their last deltas are out (remember_finished).
        self._finished: list[tuple[list[int], list[Any]]] = []
        self.stats = EngineStats()

    @property
    def active(self) -> int:
        return len(self._by_id)

    @property
    def prefix_cache_entries(self) -> int:
        return len(self._prefix_cache)

    @property
    def prefix_cache_bytes(self) -> int:
        return self._prefix_cache.nbytes

    def pending_prompt_tokens(self) -> int:
        return self.batch.pending_prompt_tokens()

    def uids(self, request_ids: list[str]) -> list[int]:
        return [self._by_id[r].uid for r in request_ids if r in self._by_id]

    # ---------------------------------------------------------------- execute

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one plan; the deltas it produced, in order."""
        self.remember_finished()
        deltas: list[TokenDelta] = []
        self._abort(plan.aborts, deltas)
        for request in plan.inserts:
            self._insert(request, deltas)
        if plan.inserts:
            # The prefix cache yields to the rows just admitted (their cached
            # prefixes are copied out by now).
            self._prefix_cache.trim_to(self.kv.cache_room())
        self.batch.set_prefill(plan.prefill_rows, plan.prefill_chunk)
        # Unseeded samplers draw from mx.random's global state: the plan's seed
        # makes every rank draw the same.
        mx.random.seed(plan.seed)
        before = self.batch.costs()
        for _ in range(plan.decode_steps):
            if not self._by_id:
                break
            self._collect(self.batch.step(), deltas)
        return StepResult(deltas, self.batch.costs().since(before))

    def reset(self) -> None:
        """Forget every request and start a fresh batch (after a step failed)."""
        for active in list(self._by_id.values()):
            self._forget(active)
        self._failures.clear()
        self.kv.clear()
        self.batch.reset()

    def _abort(self, request_ids: list[str], deltas: list[TokenDelta]) -> None:
        """Remove requests from the batch; unknown or finished ids are ignored."""
        found = [self._by_id[r] for r in request_ids if r in self._by_id]
        self.batch.remove([a.uid for a in found])
        for active in found:
            self._forget(active)
            deltas.append(TokenDelta(active.request_id, [], "abort"))

    def _insert(self, request: Generate, deltas: list[TokenDelta]) -> None:
        """Insert a request into the batch, or end it with an error."""
        try:
            self._start(request)
        except (RequestRejected, ConstraintError) as exc:
            deltas.append(TokenDelta(request.request_id, [], "error", error=str(exc)))
        except Exception as exc:  # a bad request must not take the engine down
            log.exception("could not start request %s", request.request_id)
            deltas.append(TokenDelta(request.request_id, [], "error", error=f"{type(exc).__name__}: {exc}"))

    def _sampling(self, request: Generate) -> tuple[RequestSampling, GrammarProcessor | None]:
        """Sampler and sampling processors, then the grammar mask last (nothing may lift it)."""
        sampling = build_request_sampling(request.sampling, wants_logprobs=request.logprobs is not None)
        if request.constraint is None:
            return sampling, None
        if self._grammars is None:
            raise RequestRejected("constrained decoding is not available in this engine")
        grammar = self._grammars.processor(request.constraint)
        return sampling._replace(processors=[*(sampling.processors or []), grammar]), grammar

    def _guarded(self, request: Generate, processors: list[Any] | None) -> list[Any] | None:
        processors = list(processors or [])
        injected = self._fault_injector(request) if self._fault_injector else None
        if injected is not None:
            processors.insert(0, injected)
        return [_Guarded(processors, self._failures)] if processors else None

    def _start(self, request: Generate) -> None:
        sampling, grammar = self._sampling(request)
        guarded = self._guarded(request, sampling.processors)
        prompt = request.prompt_token_ids
        cache, rest = self._fetch_prefix(prompt)
        cached = len(prompt) - len(rest)
        stops = (
            self._default_stops
            if request.stop_token_ids is None
            else StopSequences([[t] for t in request.stop_token_ids])
        )
        uid = self.batch.insert(rest, request.max_tokens, cache, prompt[:cached], sampling.sampler, guarded, stops)
        if guarded:
            guarded[0].uid = uid
        # The whole prompt: a cached prefix is copied into the row's own cache.
        self.kv.reserve(uid, len(prompt) + request.max_tokens)
        active = _Active(request.request_id, uid, cached, logprobs=request.logprobs, grammar=grammar)
        self._by_uid[uid] = active
        self._by_id[request.request_id] = active
        self.stats.prompt_tokens_processed += len(rest)
        if cached:
            self.stats.prompt_cache_hits += 1
            self.stats.prompt_cache_hit_tokens += cached

    def _fetch_prefix(self, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        """The longest cached prefix of ``prompt`` and the tokens still to prefill."""
        if self._config.prompt_cache_bytes <= 0:
            return None, prompt
        self.remember_finished()
        return self._prefix_cache.fetch(prompt)

    def _forget(self, active: _Active) -> None:
        self.kv.release(active.uid)
        self._by_uid.pop(active.uid, None)
        self._by_id.pop(active.request_id, None)
        self.stats.requests_finished += 1

    def _collect(self, responses: list[Any], deltas: list[TokenDelta]) -> None:
        """Turn one batch step's responses into deltas."""
        self.stats.tokens_generated += len(responses)
        live = [(r, a) for r in responses if (a := self._by_uid.get(r.uid)) is not None]
        live = self._drop_failed(live, deltas)
        logprobs = _logprobs([(r, a.logprobs) for r, a in live if a.logprobs is not None and r.finish_reason != "stop"])
        for r, active in live:
            finished = r.finish_reason is not None
            cached = 0 if active.first_sent else active.cached_prompt_tokens
            active.first_sent = True
            if active.grammar is not None and active.grammar.error is not None:
                # Cannot happen with a sound grammar library; never send unconstrained text.
                if not finished:
                    self.batch.remove([r.uid])
                self._forget(active)
                deltas.append(TokenDelta(active.request_id, [], "error", cached, active.grammar.error))
                continue
            if r.finish_reason == "stop":
                # The token is the EOS/stop token: never text, never logprobs.
                delta = TokenDelta(active.request_id, [], r.finish_reason, cached)
            elif r.uid in logprobs:
                chosen, top = logprobs[r.uid]
                tops = [top] if active.logprobs else None
                delta = TokenDelta(active.request_id, [r.token], r.finish_reason, cached, None, [chosen], tops)
            else:
                delta = TokenDelta(active.request_id, [r.token], r.finish_reason, cached)
            deltas.append(delta)
            if finished:
                self._forget(active)
                if r.all_tokens and r.prompt_cache is not None:
                    self._finished.append((r.all_tokens, r.prompt_cache))

    def _drop_failed(self, live: list[tuple[Any, _Active]], deltas: list[TokenDelta]) -> list[tuple[Any, _Active]]:
        """End the requests whose processors failed this step; the rest go on."""
        if not self._failures:
            return live
        failures, self._failures = self._failures, {}
        failed = [a for a in self._by_uid.values() if a.uid in failures]
        self.batch.remove([a.uid for a in failed])
        for active in failed:
            self._forget(active)
            error = f"generation failed for this request: {failures[active.uid]}"
            deltas.append(TokenDelta(active.request_id, [], "error", error=error))
        return [(r, a) for r, a in live if a.uid not in failures]

    def remember_finished(self) -> None:
        """Put the sequences finished by the last step into the prefix cache.

        The socket loop calls this after sending the step's deltas: the work
        (an evaluation and a prefix-cache insert per sequence) then delays no final token.
        The next step or prefix lookup does it otherwise, so a request that
        arrives later always sees the prefixes of those that finished before.
        """
        finished, self._finished = self._finished, []
        budget = self._config.prompt_cache_bytes
        if budget <= 0 or not finished:
            return
        # Each extracted cache is a lazy slice of the whole batch's KV buffer:
        # evaluate them now (together: one sync for the step), or the entries
        # would keep that entire buffer alive.
        mx.eval([c.state for _, cache in finished for c in cache])
        for tokens, cache in finished:
            self._prefix_cache.insert(tokens, cache)
        # What the rows reserve counts against the same budget.
        self._prefix_cache.trim_to(self.kv.cache_room())

    def memory(self) -> tuple[int, int]:
        return mx.get_active_memory(), mx.get_peak_memory()


class Scheduler:
    """Decides each step's plan (rank 0 of a sharded engine) and routes its deltas."""

    def __init__(
        self,
        model: Any,
        config: SchedulerConfig,
        grammars: GrammarCompiler | None = None,
        fault_injector: FaultInjector | None = None,
        plan_sink: PlanSink = _no_sink,
    ) -> None:
        self._config = config
        self.core = EngineCore(model, config, grammars, fault_injector)
        self._plan_sink = plan_sink
        # Admission and chunk sizes of prefill, from measured costs.
        self._prefill_rows = min(config.prefill_batch_size, config.max_batch_size)
        self._prefill = PrefillPolicy(config.prefill_step_size)
        self._announcements = Announcements()
        self._planned_decoding_rows = 0  # the last plan's, for its measured costs
        # Requests not finished yet (queued here or in the batch) and their workers.
        self._owners: dict[str, WorkerId] = {}
        # Accepted requests that the next plan inserts, in arrival order.
        self._inbox: dict[str, Generate] = {}
        # Requests in the batch that the next plan removes (an ordered set).
        self._aborts: dict[str, None] = {}
        # Finals decided here (aborts of queued requests, rejections), sent with the next step.
        self._pending: Outputs = defaultdict(list)
        # Only this rank draws the steps' seeds (from the OS's entropy).
        self._seeds = random.Random()

    # ------------------------------------------------------------------ state

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    @property
    def running(self) -> int:
        return len(self._owners)

    @property
    def queued(self) -> int:
        # Requests accepted but not yet in the decode batch (waiting or prefilling).
        rows = self.core.batch.rows()
        return len(self._inbox) + rows.waiting + rows.prefilling

    @property
    def prefix_cache_entries(self) -> int:
        return self.core.prefix_cache_entries

    @property
    def prefix_cache_bytes(self) -> int:
        return self.core.prefix_cache_bytes

    @property
    def kv_budget_bytes(self) -> int:
        return self.core.kv.budget_bytes

    @property
    def kv_reserved_bytes(self) -> int:
        return self.core.kv.reserved_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.core.kv.bytes_per_token

    @property
    def kv_quantization(self) -> tuple[int | None, int]:
        """(bits, group size) of the KV cache; bits None: full precision."""
        return self._config.kv_bits, self._config.kv_group_size

    def memory(self) -> tuple[int, int]:
        return self.core.memory()

    def has_work(self) -> bool:
        return bool(self._pending or self._inbox or self._aborts or self.core.active)

    def wait_s(self) -> float | None:
        """How long the socket loop may wait for messages before the next step:
        None (until one comes) when there is no work; while nothing runs and
        the waiting requests are held for announced ones, the rest of that
        hold (their arrival ends the wait sooner); else 0."""
        if not self.has_work():
            return None
        if self._pending or self._aborts:
            return 0.0
        rows = self.core.batch.rows()
        if rows.prefilling or rows.decoding:
            return 0.0
        return self._prefill.hold_left(time.monotonic())

    def arriving(self, worker: WorkerId, seq: int) -> None:
        """A worker announced a request (``Arriving``): it is on its way."""
        self._announcements.arriving(worker, seq, time.monotonic())

    def settled(self, worker: WorkerId, seq: int) -> None:
        """What that announced request submits has come (``Settled``)."""
        self._announcements.settled(worker, seq, time.monotonic())

    def has_request(self, request_id: str) -> bool:
        return request_id in self._owners

    # ------------------------------------------------------------------ input

    def add(self, worker: WorkerId, request: Generate) -> None:
        """Accept a request for the next plan, or end it with an error."""
        try:
            self._validate(request)
        except Overloaded as exc:
            self._finish_now(worker, request.request_id, "overloaded", str(exc))
        except TooLarge as exc:
            self._finish_now(worker, request.request_id, "too_large", str(exc))
        except RequestRejected as exc:
            self._finish_now(worker, request.request_id, "error", str(exc))
        except Exception as exc:  # a bad request must not take the engine down
            log.exception("could not accept request %s", request.request_id)
            self._finish_now(worker, request.request_id, "error", f"{type(exc).__name__}: {exc}")
        else:
            self._owners[request.request_id] = worker
            self._inbox[request.request_id] = request

    def _validate(self, request: Generate) -> None:
        cfg = self._config
        if request.request_id in self._owners:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        prompt = request.prompt_token_ids
        if not prompt:
            raise RequestRejected("empty prompt")
        if request.max_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1")
        if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise RequestRejected(f"prompt token ids must be in [0, {cfg.vocab_size})")
        bias = request.sampling.logit_bias
        # The bias may go into a sampler the whole batch shares: a bad id would fail every row.
        if bias and (min(bias) < 0 or max(bias) >= cfg.vocab_size):
            raise RequestRejected(f"logit_bias token ids must be in [0, {cfg.vocab_size})")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestRejected(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if len(prompt) + request.max_tokens > cfg.context_length:
            raise TooLarge(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) "
                f"exceeds the context length {cfg.context_length}"
            )
        kv = self.core.kv
        need = kv.alone_bytes(len(prompt) + request.max_tokens)
        if need > kv.budget_bytes:
            # It would wait forever: even an empty engine cannot hold it.
            raise TooLarge(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) need {need / 1e6:.1f} MB "
                f"of KV cache ({kv.bytes_per_token} bytes per token), more than the engine's KV budget of "
                f"{kv.budget_bytes / 1e6:.1f} MB (kv_cache_budget_bytes): shorten the prompt or max_tokens"
            )
        # Last: a request that no load would let run is told so, not to retry.
        if self.queued >= cfg.max_queued_requests:
            raise Overloaded(f"{self.queued} requests are already waiting (max_queued_requests)")

    def abort(self, request_ids: list[str]) -> None:
        """End requests; unknown or finished ids are ignored."""
        for request_id in request_ids:
            if request_id not in self._owners:
                continue
            if self._inbox.pop(request_id, None) is None:
                self._aborts[request_id] = None  # its final comes from the step that removes it
            else:
                self._pending[self._owners.pop(request_id)].append(TokenDelta(request_id, [], "abort"))

    def drop_worker(self, worker: WorkerId) -> int:
        """A frontend worker went away: abort everything it owned, silently."""
        ids = [r for r, w in self._owners.items() if w == worker]
        for request_id in ids:
            del self._owners[request_id]  # its final has nobody to go to
            if self._inbox.pop(request_id, None) is None:
                self._aborts[request_id] = None
        self._pending.pop(worker, None)
        self._announcements.drop(worker)
        return len(ids)

    def fail_all(self, reason: str) -> None:
        """End every request with an error and start a fresh batch (after a step failed)."""
        for request_id, worker in self._owners.items():
            self._pending[worker].append(TokenDelta(request_id, [], "error", error=reason))
        self._owners.clear()
        self._inbox.clear()
        self._aborts.clear()
        self.core.reset()

    def _finish_now(self, worker: WorkerId, request_id: str, reason: FinishReason, error: str) -> None:
        self._pending[worker].append(TokenDelta(request_id, [], reason, error=error))

    # ------------------------------------------------------------------ step

    def step(self) -> Outputs:
        """Plan a step, execute it, and return all deltas grouped by worker."""
        plan = self.plan()
        if plan is None:
            return self.collect(None)
        self._plan_sink(plan)
        started = time.perf_counter()
        outputs = self.collect(self.core.execute(plan))
        if log.isEnabledFor(logging.DEBUG):
            _trace_step(plan, self.core.batch.rows(), time.perf_counter() - started)
        return outputs

    def plan(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to execute.

        Holding arrivals back while a burst is still coming, and the prefill
        chunk size, come from the clock and the measured costs: only here."""
        if not (self._inbox or self._aborts or self.core.active):
            return None
        aborts, self._aborts = list(self._aborts), {}
        leaving = self.core.uids(aborts)  # rows this step removes: their KV and slots are free
        inserts = self._admit_by_kv(leaving)
        rows = self.core.batch.rows(without=leaving)
        self._planned_decoding_rows = rows.decoding
        waiting = rows.waiting + len(inserts)
        free_rows = max(min(self._prefill_rows - rows.prefilling, self._config.max_batch_size - rows.decoding), 0)
        busy = bool(rows.prefilling or rows.decoding)
        now = time.monotonic()
        announced = self._announcements.pending(now)
        admit = self._prefill.admit(now, waiting, free_rows, len(inserts), busy=busy, announced=announced)
        admitted = min(waiting, free_rows) if admit else 0
        # Prompt tokens the prefill batch will hold (prefix-cache hits not yet
        # subtracted: an upper bound): a short prefill is not chunked.
        work = self.core.batch.prompt_work()
        queue = [*work.waiting, *(len(r.prompt_token_ids) for r in inserts)]
        tokens_left = work.prefilling + sum(queue[: max(admitted, 0)])
        return StepPlan(
            aborts=aborts,
            inserts=inserts,
            # A prefill batch size equal to the rows already prefilling admits nobody new.
            prefill_rows=self._prefill_rows if admit else rows.prefilling,
            prefill_chunk=self._prefill.chunk(rows.prefilling + admitted, rows.decoding, tokens_left),
            seed=self._seeds.getrandbits(32),
        )

    def _admit_by_kv(self, leaving: list[int]) -> list[Generate]:
        """Take from the inbox, in arrival order, the requests whose KV reservation
        fits the budget beside the rows that stay; the others keep waiting
        (counted in ``queued``). The prefix cache yields what they need."""
        waiting = list(self._inbox.values())
        fit = self.core.kv.admissible((len(r.prompt_token_ids) + r.max_tokens for r in waiting), without=leaving)
        admitted = waiting[:fit]
        for request in admitted:
            del self._inbox[request.request_id]
        return admitted

    def collect(self, result: StepResult | None) -> Outputs:
        """The finals decided here, then the step's deltas, grouped by worker;
        the step's measured costs size later prefill chunks."""
        outputs, self._pending = self._pending, defaultdict(list)
        if result is None:
            return outputs
        self._prefill.learn(*result.costs, decoding_rows=self._planned_decoding_rows)
        for delta in result.deltas:
            worker = self._owners.get(delta.request_id)
            if worker is None:
                continue  # its worker went away
            if delta.finish_reason is not None:
                del self._owners[delta.request_id]
            outputs[worker].append(delta)
        return outputs

    def remember_finished(self) -> None:
        self.core.remember_finished()


def _trace_step(plan: StepPlan, rows: BatchRows, seconds: float) -> None:
    """One debug line per step: what it admitted and ran, and how long it took
    (where a burst's first tokens wait: ``MLX_SERVER_LOG_LEVEL=debug``)."""
    log.debug(
        "step t=%.1f ms: +%d inserted, -%d aborted, prefill rows %d chunk %d; now %d waiting, %d prefilling, "
        "%d decoding; took %.2f ms",
        time.monotonic() * 1000 % 1e6,
        len(plan.inserts),
        len(plan.aborts),
        plan.prefill_rows,
        plan.prefill_chunk,
        rows.waiting,
        rows.prefilling,
        rows.decoding,
        seconds * 1000,
    )


def _logprobs(wanted: list[tuple[Any, int]]) -> dict[int, tuple[float, list[tuple[int, float]]]]:
    """uid -> (sampled token's logprob, [(id, logprob)] of the top k, best first).

    One gather and one argpartition over the rows that asked, one transfer
    to Python; rows that did not ask cost nothing. Each response's
    ``logprobs`` is its row of the (processed) log-softmax, already evaluated.
    """
    if not wanted:
        return {}
    rows = mx.stack([r.logprobs for r, _ in wanted])
    tokens = mx.array([r.token for r, _ in wanted])[:, None]
    chosen = mx.maximum(mx.take_along_axis(rows, tokens, axis=-1)[:, 0], LOGPROB_FLOOR)
    k = max(top for _, top in wanted)
    if k == 0:
        values: list[float] = chosen.tolist()  # type: ignore[assignment]
        return {r.uid: (v, []) for (r, _), v in zip(wanted, values)}
    k = min(k, rows.shape[-1])
    ids = mx.argpartition(-rows, kth=k - 1, axis=-1)[:, :k]
    top_values = mx.take_along_axis(rows, ids, axis=-1)
    order = mx.argsort(-top_values, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1)
    top_values = mx.maximum(mx.take_along_axis(top_values, order, axis=-1), LOGPROB_FLOOR)
    mx.eval(chosen, ids, top_values)
    chosen_list: list[float] = chosen.tolist()  # type: ignore[assignment]
    ids_list: list[list[int]] = ids.tolist()  # type: ignore[assignment]
    values_list: list[list[float]] = top_values.tolist()  # type: ignore[assignment]
    out = {}
    for (r, want), value, row_ids, row_values in zip(wanted, chosen_list, ids_list, values_list):
        out[r.uid] = (value, list(zip(row_ids[:want], row_values[:want])))
    return out
