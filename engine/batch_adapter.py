"""The one module that touches mlx-lm's BatchGenerator, private fields included.

BatchGenerator has no public way to count its rows per stage, to read its
own timers, or to change prefill admission and chunk size between steps:
it keeps them in fields whose names change between mlx-lm releases, so
only this module names them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from engine.quantized_cache import check_kv_quantization, quantized_row_cache


class BatchRows(NamedTuple):
    waiting: int  # inserted, not prefilling yet
    prefilling: int
    decoding: int


class PromptWork(NamedTuple):
    """Prompt tokens still to prefill (the last one included, which the first decode step feeds)."""

    prefilling: int  # all rows in the prefill batch together
    waiting: list[int]  # per inserted row not prefilling yet, in admission order


class StepCosts(NamedTuple):
    """BatchGenerator's own timers over some steps (decode and prefill forwards)."""

    decode_steps: int = 0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0

    def since(self, before: StepCosts) -> StepCosts:
        return StepCosts(
            self.decode_steps - before.decode_steps,
            self.decode_s - before.decode_s,
            self.prompt_tokens - before.prompt_tokens,
            self.prompt_s - before.prompt_s,
        )


class Batch:
    """A continuous batch: BatchGenerator behind the calls the engine makes."""

    def __init__(
        self,
        model: Any,
        eos_token_ids: Sequence[int],
        max_rows: int,
        prefill_rows: int,
        prefill_chunk: int,
        *,
        kv_bits: int | None,
        kv_group_size: int,
    ) -> None:
        # kv_bits: every row's cache is quantized from its first token (a row
        # without a cached prefix gets a fresh quantized cache here, so
        # BatchGenerator merges quantized rows only); None: mlx-lm's own
        # full-precision caches, untouched.
        if kv_bits is not None:
            check_kv_quantization(model, kv_bits, kv_group_size)
        self._row_cache: Callable[[], list[Any]] | None = (
            None if kv_bits is None else lambda: quantized_row_cache(model, kv_bits, kv_group_size)
        )
        self._new = lambda: BatchGenerator(
            model,
            stop_tokens=[[t] for t in eos_token_ids],
            completion_batch_size=max_rows,
            prefill_batch_size=prefill_rows,
            prefill_step_size=prefill_chunk,
        )
        self._gen = self._new()
        # Rows whose first token a step returned before BatchGenerator did.
        self._previewed: set[int] = set()

    def reset(self) -> None:
        """Drop every row (after a failed step): a fresh generator."""
        self._gen = self._new()
        self._previewed.clear()

    def insert(
        self,
        tokens: list[int],
        max_tokens: int,
        cache: list[Any] | None,
        cached_tokens: list[int],
        sampler: Callable[[Any], Any],
        processors: list[Callable[[Any, Any], Any]] | None,
        stops: StopSequences,
    ) -> int:
        """Queue one prompt (``tokens`` still to prefill after ``cache``); its uid."""
        if cache is None and self._row_cache is not None:
            cache = self._row_cache()
        (uid,) = self._gen.insert(
            [tokens],
            max_tokens=[max_tokens],
            caches=[cache],  # type: ignore[list-item]  # None: no cached prefix, as mlx-lm accepts
            all_tokens=[cached_tokens],
            samplers=[sampler],
            logits_processors=[processors],  # type: ignore[list-item]  # None: no processors
            stop_sequences=[stops],
        )
        return uid

    def remove(self, uids: list[int]) -> None:
        if uids:
            self._gen.remove(uids)
            self._previewed.difference_update(uids)

    def rows(self, without: Iterable[int] = ()) -> BatchRows:
        """Rows per stage, not counting the uids in ``without``."""
        gen = self._gen
        # _find_uids' stage index is the position in this list.
        counts = [len(gen._unprocessed_sequences), len(gen._prompt_batch), len(gen._generation_batch)]
        uids = list(without)
        for stage, _ in gen._find_uids(uids).values() if uids else ():
            counts[stage] -= 1
        return BatchRows(*counts)

    def prompt_work(self) -> PromptWork:
        """What prefill is left: the rows in the prefill batch (their progress)
        and the inserted rows waiting for it (their prompt segments)."""
        gen = self._gen
        # _currently_processing: [segments, tokens done, tokens in all]; _unprocessed_sequences: (uid, segments, ...).
        prefilling = sum(total - done for _, done, total in gen._currently_processing)
        waiting = [sum(len(s) for s in seq[1]) for seq in gen._unprocessed_sequences]
        return PromptWork(prefilling, waiting)

    def pending_prompt_tokens(self) -> int:
        """Prompt tokens inserted and not prefilled yet (waiting or prefilling rows)."""
        work = self.prompt_work()
        return work.prefilling + sum(work.waiting)

    def set_prefill(self, rows: int, chunk: int) -> None:
        """Prefill admission and chunk size of the next steps: BatchGenerator
        reads both attributes at every step."""
        self._gen.prefill_batch_size = rows
        self._gen.prefill_step_size = chunk

    def step(self) -> list[Any]:
        """One decode step, at most one prefill forward, and the first token of
        the rows that prefill finished; the responses (one token per row)."""
        _, responses = self._gen.next()
        if self._previewed:
            responses = [r for r in responses if not self._already_sent(r)]
        return responses + self._start_decoding_prefilled()

    def _already_sent(self, response: Any) -> bool:
        """Whether ``response`` repeats a first token that ``_start_decoding_prefilled``
        returned: BatchGenerator returns every row's first token from the step after
        the one that computed it, with its count and stop checks."""
        if response.uid not in self._previewed:
            return False
        self._previewed.discard(response.uid)
        # A first token that ends its row (max_tokens 1, a stop token) is never
        # returned early, so its repeat carries no finish to keep.
        return response.finish_reason is None

    def _start_decoding_prefilled(self) -> list[Any]:
        """Move the rows whose prompt this step finished into the decode batch
        now, and return their first tokens.

        BatchGenerator moves them at the start of its next step, which only
        queues their last prompt token's forward: their first token then comes
        a step later still (three steps from insert to first token). Here the
        forward is queued at the end of the step that prefilled them and its
        token is returned with that step: one step from the prefill's end, the
        same forwards, and the first token does not wait for the next step's
        forward to be built (on a GPU bound by launching kernels, that build is
        most of a step). Mirrors the split at the top of BatchGenerator._next,
        which then finds nothing left to move.
        """
        gen = self._gen
        if len(gen._generation_batch) >= gen.completion_batch_size:
            return []  # BatchGenerator would not move them either
        # _currently_processing: [segments still to prefill, done, total]; a row
        # down to its one last token is ready for its first decode forward.
        ready = [
            i
            for i, (segments, _, _) in enumerate(gen._currently_processing)
            if len(segments) == 1 and len(segments[0]) == 1
        ]
        if not ready:
            return []
        last_tokens = [gen._currently_processing[i][0][0] for i in ready]
        moving = set(ready)
        gen._currently_processing = [row for i, row in enumerate(gen._currently_processing) if i not in moving]
        with mx.stream(gen._stream):
            started = gen._prompt_batch.split(ready).generate(last_tokens)
            first = self._first_tokens(started)
            gen._generation_batch.extend(started)
        return first

    def _first_tokens(self, started: Any) -> list[Any]:
        """Responses for the first tokens a new decode batch has just computed,
        except those that end their row (left to BatchGenerator's own checks);
        the rows returned are remembered so that their repeat is dropped."""
        # _next_tokens / _next_logprobs: the sampled first tokens and their rows
        # of log-probabilities; _matchers: each row's place in its stop sequences.
        mx.eval(started._next_tokens, started._next_logprobs)
        first = []
        for i, token in enumerate(started._next_tokens.tolist()):
            ends = started.max_tokens[i] <= 1 or copy.copy(started._matchers[i]).advance(token)
            if ends:
                continue
            uid = started.uids[i]
            first.append(started.Response(uid, token, started._next_logprobs[i], None, None, None))
            self._previewed.add(uid)
        return first

    def costs(self) -> StepCosts:
        """The timers so far; ``costs().since(before)`` is what steps in between cost."""
        c = self._gen._counters
        return StepCosts(c.generation_steps, c.decode_time, c.prompt_tokens, c.prompt_time)
