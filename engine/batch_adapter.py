"""The one module that touches mlx-lm's BatchGenerator, private fields included.

BatchGenerator has no public way to count its rows per stage, to read its
own timers, or to change prefill admission and chunk size between steps:
it keeps them in fields whose names change between mlx-lm releases, so
only this module names them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from mlx_lm.generate import BatchGenerator, StopSequences


class BatchRows(NamedTuple):
    waiting: int  # inserted, not prefilling yet
    prefilling: int
    decoding: int


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
    ) -> None:
        self._new = lambda: BatchGenerator(
            model,
            stop_tokens=[[t] for t in eos_token_ids],
            completion_batch_size=max_rows,
            prefill_batch_size=prefill_rows,
            prefill_step_size=prefill_chunk,
        )
        self._gen = self._new()

    def reset(self) -> None:
        """Drop every row (after a failed step): a fresh generator."""
        self._gen = self._new()

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

    def rows(self, without: Iterable[int] = ()) -> BatchRows:
        """Rows per stage, not counting the uids in ``without``."""
        gen = self._gen
        # _find_uids' stage index is the position in this list.
        counts = [len(gen._unprocessed_sequences), len(gen._prompt_batch), len(gen._generation_batch)]
        uids = list(without)
        for stage, _ in gen._find_uids(uids).values() if uids else ():
            counts[stage] -= 1
        return BatchRows(*counts)

    def pending_prompt_tokens(self) -> int:
        """Prompt tokens inserted and not prefilled yet (waiting or prefilling rows)."""
        gen = self._gen
        # Waiting: (uid, segments, ...); prefilling: [segments left, tokens done, tokens in all].
        waiting = sum(len(segment) for seq in gen._unprocessed_sequences for segment in seq[1])
        return waiting + sum(total - done for _, done, total in gen._currently_processing)

    def set_prefill(self, rows: int, chunk: int) -> None:
        """Prefill admission and chunk size of the next steps: BatchGenerator
        reads both attributes at every step."""
        self._gen.prefill_batch_size = rows
        self._gen.prefill_step_size = chunk

    def step(self) -> list[Any]:
        """One decode step and at most one prefill forward; the decode responses."""
        _, responses = self._gen.next()
        return responses

    def costs(self) -> StepCosts:
        """The timers so far; ``costs().since(before)`` is what steps in between cost."""
        c = self._gen._counters
        return StepCosts(c.generation_steps, c.decode_time, c.prompt_tokens, c.prompt_time)

    @property
    def prompt_cache_nbytes(self) -> int:
        return self._gen.prompt_cache_nbytes
