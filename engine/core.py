"""Scheduling of wire requests over mlx-lm's BatchGenerator (no sockets here).

The Scheduler owns the continuous batch and the prefix cache. ``add`` and
``abort`` may be called between steps; ``step`` advances the batch once and
returns every delta produced, grouped by the frontend worker that owns the
request, so the socket loop sends one message per worker per step.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from engine.constraints import ConstraintError, GrammarCompiler, GrammarProcessor
from engine.prefill import PrefillPolicy
from engine.prefix_cache import PrefixCache
from engine.sampling import RequestSampling, build_request_sampling
from ipc.messages import LOGPROB_FLOOR, Generate, TokenDelta

log = logging.getLogger(__name__)

WorkerId = bytes
Outputs = dict[WorkerId, list[TokenDelta]]

# Entry count cap of the prefix cache; the byte cap is the real limit.
PREFIX_CACHE_MAX_ENTRIES = 256
# A shorter cached prefix (a chat template's opening, a first word) is not
# reused: copying it out costs about what prefilling it would, and rows with
# cached prefixes of unequal lengths make the prefill batch take mlx-lm's
# padded path (measured on an H100: bursts of such hits prefilled ~20x slower).
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


@dataclass
class _Active:
    request_id: str
    worker: WorkerId
    uid: int
    cached_prompt_tokens: int
    first_sent: bool = False
    # None: no logprobs wanted; k: sampled logprob plus the top k.
    logprobs: Optional[int] = None
    grammar: Optional[GrammarProcessor] = None


@dataclass
class SchedulerStats:
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


# Test-only seam (never reachable from settings or the wire): given a request,
# an extra logits processor to run for it, e.g. one that raises.
FaultInjector = Callable[[Generate], Optional[Callable[[Any, Any], Any]]]


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


class Scheduler:
    def __init__(
        self,
        model: Any,
        config: SchedulerConfig,
        make_generator: Optional[Callable[..., BatchGenerator]] = None,
        grammars: Optional[GrammarCompiler] = None,
        fault_injector: Optional[FaultInjector] = None,
    ) -> None:
        self._fault_injector = fault_injector
        # Admission and chunk sizes of prefill, from measured costs.
        # mlx-lm would let a prefill batch larger than the decode batch grow the
        # decode batch past max_batch_size: prefill rows never exceed it here.
        self._prefill_rows = min(config.prefill_batch_size, config.max_batch_size)
        self._prefill = PrefillPolicy(config.prefill_step_size)
        self._arrivals = 0  # requests inserted since the last step
        # uid -> error, filled by _Guarded during a step.
        self._failures: dict[int, str] = {}
        self._model = model
        self._config = config
        self._grammars = grammars  # None: constrained requests are refused
        self._make_generator = make_generator or BatchGenerator
        self._default_stops = StopSequences([[t] for t in config.eos_token_ids])
        self._prefix_cache = PrefixCache(
            max(config.prompt_cache_bytes, 0), PREFIX_CACHE_MAX_ENTRIES, MIN_PREFIX_REUSE_TOKENS
        )
        self._by_uid: dict[int, _Active] = {}
        self._by_id: dict[str, _Active] = {}
        # Finals produced outside a step (aborts, rejections), sent with the next step.
        self._pending: Outputs = defaultdict(list)
        # Finished sequences' tokens and caches, kept for the prefix cache once
        # their last deltas are out (remember_finished).
        self._finished: list[tuple[list[int], list[Any]]] = []
        self.stats = SchedulerStats()
        self._generator = self._new_generator()

    # ------------------------------------------------------------------ state

    def _new_generator(self) -> BatchGenerator:
        cfg = self._config
        return self._make_generator(
            self._model,
            stop_tokens=[[t] for t in cfg.eos_token_ids],
            completion_batch_size=cfg.max_batch_size,
            prefill_batch_size=self._prefill_rows,
            prefill_step_size=cfg.prefill_step_size,
        )

    @property
    def running(self) -> int:
        return len(self._by_id)

    @property
    def queued(self) -> int:
        # Requests inserted but not yet in the decode batch (waiting or prefilling).
        return len(self._generator._unprocessed_sequences) + len(self._generator._prompt_batch)

    @property
    def prefix_cache_entries(self) -> int:
        return len(self._prefix_cache)

    @property
    def prefix_cache_bytes(self) -> int:
        return self._prefix_cache.nbytes

    def has_work(self) -> bool:
        return bool(self._by_id) or bool(self._pending)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._by_id

    # ------------------------------------------------------------------ input

    def add(self, worker: WorkerId, request: Generate) -> None:
        """Insert a request into the running batch, or end it with an error."""
        try:
            self._insert(worker, request)
        except Overloaded as exc:
            self._finish_now(worker, request.request_id, "overloaded", str(exc))
        except (RequestRejected, ConstraintError) as exc:
            self._finish_now(worker, request.request_id, "error", str(exc))
        except Exception as exc:  # a bad request must not take the engine down
            log.exception("could not start request %s", request.request_id)
            self._finish_now(worker, request.request_id, "error", f"{type(exc).__name__}: {exc}")

    def _validate(self, request: Generate) -> None:
        cfg = self._config
        if request.request_id in self._by_id:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        if self.queued >= cfg.max_queued_requests:
            raise Overloaded(f"{self.queued} requests are already waiting (max_queued_requests)")
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
            raise RequestRejected(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) "
                f"exceeds the context length {cfg.context_length}"
            )

    def _sampling(self, request: Generate) -> tuple[RequestSampling, Optional[GrammarProcessor]]:
        """Sampler and sampling processors, then the grammar mask last (nothing may lift it)."""
        sampling = build_request_sampling(request.sampling, wants_logprobs=request.logprobs is not None)
        if request.constraint is None:
            return sampling, None
        if self._grammars is None:
            raise RequestRejected("constrained decoding is not available in this engine")
        grammar = self._grammars.processor(request.constraint)
        return sampling._replace(processors=[*(sampling.processors or []), grammar]), grammar

    def _guarded(self, request: Generate, processors: Optional[list[Any]]) -> Optional[list[Any]]:
        processors = list(processors or [])
        injected = self._fault_injector(request) if self._fault_injector else None
        if injected is not None:
            processors.insert(0, injected)
        return [_Guarded(processors, self._failures)] if processors else None

    def _insert(self, worker: WorkerId, request: Generate) -> None:
        self._validate(request)
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
        (uid,) = self._generator.insert(
            [rest],
            max_tokens=[request.max_tokens],
            caches=[cache],
            all_tokens=[prompt[:cached]],
            samplers=[sampling.sampler],
            logits_processors=[guarded],
            stop_sequences=[stops],
        )
        if guarded:
            guarded[0].uid = uid
        active = _Active(request.request_id, worker, uid, cached, logprobs=request.logprobs, grammar=grammar)
        self._by_uid[uid] = active
        self._by_id[request.request_id] = active
        self._arrivals += 1
        self.stats.prompt_tokens_processed += len(rest)
        if cached:
            self.stats.prompt_cache_hits += 1
            self.stats.prompt_cache_hit_tokens += cached

    def _fetch_prefix(self, prompt: list[int]) -> tuple[Optional[list[Any]], list[int]]:
        """The longest cached prefix of ``prompt`` and the tokens still to prefill."""
        if self._config.prompt_cache_bytes <= 0:
            return None, prompt
        self.remember_finished()
        return self._prefix_cache.fetch(prompt)

    def abort(self, request_ids: list[str]) -> None:
        """Remove requests from the batch; unknown or finished ids are ignored."""
        found = [self._by_id[r] for r in request_ids if r in self._by_id]
        if not found:
            return
        self._generator.remove([a.uid for a in found])
        for active in found:
            self._forget(active)
            self._pending[active.worker].append(TokenDelta(active.request_id, [], "abort"))

    def drop_worker(self, worker: WorkerId) -> int:
        """A frontend worker went away: abort everything it owned, silently."""
        ids = [a.request_id for a in self._by_id.values() if a.worker == worker]
        self.abort(ids)
        self._pending.pop(worker, None)
        return len(ids)

    def fail_all(self, reason: str) -> None:
        """End every request with an error and start a fresh batch (after a step failed)."""
        for active in list(self._by_id.values()):
            self._forget(active)
            self._pending[active.worker].append(
                TokenDelta(active.request_id, [], "error", error=reason)
            )
        self._generator = self._new_generator()

    def _finish_now(self, worker: WorkerId, request_id: str, reason: str, error: str) -> None:
        self._pending[worker].append(TokenDelta(request_id, [], reason, error=error))

    def _forget(self, active: _Active) -> None:
        self._by_uid.pop(active.uid, None)
        self._by_id.pop(active.request_id, None)
        self.stats.requests_finished += 1

    # ------------------------------------------------------------------ step

    def step(self) -> Outputs:
        """Advance the batch once; return all deltas grouped by worker."""
        self.remember_finished()
        outputs, self._pending = self._pending, defaultdict(list)
        if not self._by_id:
            return outputs
        self._plan_prefill()
        before = self._step_timers()
        _, responses = self._generator.next()
        self._learn_costs(before, self._step_timers())
        self.stats.tokens_generated += len(responses)
        live = [(r, a) for r in responses if (a := self._by_uid.get(r.uid)) is not None]
        live = self._drop_failed(live, outputs)
        logprobs = _logprobs([(r, a.logprobs) for r, a in live if a.logprobs is not None and r.finish_reason != "stop"])
        for r, active in live:
            finished = r.finish_reason is not None
            cached = 0 if active.first_sent else active.cached_prompt_tokens
            active.first_sent = True
            if active.grammar is not None and active.grammar.error is not None:
                # Cannot happen with a sound grammar library; never send unconstrained text.
                if not finished:
                    self._generator.remove([r.uid])
                self._forget(active)
                outputs[active.worker].append(TokenDelta(active.request_id, [], "error", cached, active.grammar.error))
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
            outputs[active.worker].append(delta)
            if finished:
                self._forget(active)
                if r.all_tokens and r.prompt_cache is not None:
                    self._finished.append((r.all_tokens, r.prompt_cache))
        return outputs

    def _plan_prefill(self) -> None:
        """Set this step's prefill admission and chunk size on the generator
        (BatchGenerator reads both attributes at every step)."""
        gen, cfg = self._generator, self._config
        waiting = len(gen._unprocessed_sequences)
        prefilling, decoding = len(gen._prompt_batch), len(gen._generation_batch)
        free_rows = max(min(self._prefill_rows - prefilling, cfg.max_batch_size - decoding), 0)
        arrivals, self._arrivals = self._arrivals, 0
        admit = self._prefill.admit(time.monotonic(), waiting, free_rows, arrivals, busy=bool(prefilling or decoding))
        # A prefill batch size equal to the rows already prefilling admits nobody new.
        gen.prefill_batch_size = self._prefill_rows if admit else prefilling
        rows = prefilling + (min(waiting, free_rows) if admit else 0)
        gen.prefill_step_size = self._prefill.chunk(rows, decoding_rows=decoding)

    def _step_timers(self) -> tuple[float, float, int, int]:
        c = self._generator._counters
        return c.decode_time, c.prompt_time, c.prompt_tokens, c.generation_steps

    def _learn_costs(self, before: tuple[float, float, int, int], after: tuple[float, float, int, int]) -> None:
        decode_s, prompt_s, prompt_tokens, steps = (a - b for a, b in zip(after, before))
        self._prefill.learn(steps, decode_s, prompt_tokens, prompt_s)

    def _drop_failed(self, live: list[tuple[Any, _Active]], outputs: Outputs) -> list[tuple[Any, _Active]]:
        """End the requests whose processors failed this step; the rest go on."""
        if not self._failures:
            return live
        failures, self._failures = self._failures, {}
        failed = [a for a in self._by_uid.values() if a.uid in failures]
        self._generator.remove([a.uid for a in failed])
        for active in failed:
            self._forget(active)
            error = f"generation failed for this request: {failures[active.uid]}"
            outputs[active.worker].append(TokenDelta(active.request_id, [], "error", error=error))
        return [(r, a) for r, a in live if a.uid not in failures]

    def remember_finished(self) -> None:
        """Put the sequences finished by the last step into the prefix cache.

        The socket loop calls this after sending the step's deltas: the work
        (an evaluation and a trie insert per token) then delays no final token.
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
        # Live batch caches count against the same budget (as in mlx_lm.server).
        self._prefix_cache.trim_to(n_bytes=budget - self._generator.prompt_cache_nbytes)

    def memory(self) -> tuple[int, int]:
        return mx.get_active_memory(), mx.get_peak_memory()


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
        values = chosen.tolist()
        return {r.uid: (v, []) for (r, _), v in zip(wanted, values)}
    k = min(k, rows.shape[-1])
    ids = mx.argpartition(-rows, kth=k - 1, axis=-1)[:, :k]
    top_values = mx.take_along_axis(rows, ids, axis=-1)
    order = mx.argsort(-top_values, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1)
    top_values = mx.maximum(mx.take_along_axis(top_values, order, axis=-1), LOGPROB_FLOOR)
    mx.eval(chosen, ids, top_values)
    out = {}
    for (r, want), value, row_ids, row_values in zip(wanted, chosen.tolist(), ids.tolist(), top_values.tolist()):
        out[r.uid] = (value, list(zip(row_ids[:want], row_values[:want])))
    return out
