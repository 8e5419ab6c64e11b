"""The ceiling: mlx-lm's BatchGenerator driven in this process, no HTTP, no IPC.

It does the same work per token that the servers ask of the engine: one logit
bias processor per request (eos ids -> -100, as the HTTP targets send), eos ids
as stop tokens, greedy sampling shared by the batch. With `logit_bias=False`
("raw_nobias") there are neither processors nor stop tokens: the same number of
tokens without mlx-lm's per-row Python processor loop, to show what it costs.
mlx is imported only here, so the HTTP runs never load it into the load generator.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.servers import GpuBusy, busy_cpu_seconds
from bench.stats import CpuUse, RequestResult, RunResult


class RawEngine:
    """The model loaded once; each `run` is a fresh BatchGenerator over one batch of prompts."""

    def __init__(self, model_dir: Path) -> None:
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_dir))

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        eos_ids: Sequence[int],
        logit_bias: bool,
        deadline_s: float,
        name: str = "raw",
        prefill_batch_size: int | None = None,
    ) -> RunResult:
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.sample_utils import make_logits_processors

        n = len(prompts)
        bias = {int(e): -100.0 for e in eos_ids}
        processors: Any = [make_logits_processors(logit_bias=bias) for _ in prompts] if logit_bias else None
        gen = BatchGenerator(
            self.model,
            completion_batch_size=n,
            prefill_batch_size=prefill_batch_size or n,  # as mlx_lm.server's --prompt-concurrency here
            # No stop tokens without the bias: eos must not end a stream early.
            stop_tokens=[[int(e)] for e in eos_ids] if logit_bias else None,
        )
        results: dict[int, RequestResult] = {}
        last: dict[int, float] = {}
        cpu0, thread0, busy0 = time.process_time(), time.thread_time(), busy_cpu_seconds()
        gpu = GpuBusy().__enter__()
        start = time.perf_counter()
        try:
            uids = gen.insert([list(p) for p in prompts], max_tokens=[max_tokens] * n, logits_processors=processors)
            results = {uid: RequestResult() for uid in uids}
            running = n
            steps, step_s = 0, 0.0
            while running:
                if time.perf_counter() - start > deadline_s:
                    for r in results.values():
                        if r.chunks < max_tokens:
                            r.error = "cut by the overall deadline"
                    break
                before = time.perf_counter()
                _, responses = gen.next()
                now = time.perf_counter()
                steps, step_s = steps + 1, step_s + now - before
                for resp in responses:
                    r = results[resp.uid]
                    r.chunks += 1
                    prev = last.get(resp.uid)
                    if prev is None:
                        r.ttft_s = now - start
                    else:
                        r.itl_s.append(now - prev)
                    last[resp.uid] = now
                    if resp.finish_reason is not None:
                        running -= 1
            wall = time.perf_counter() - start
        finally:
            gen.close()
            gpu.__exit__()
        engine_s = time.process_time() - cpu0
        cpu = CpuUse(
            server_s={"engine": engine_s},
            other_s=max(busy_cpu_seconds() - busy0 - engine_s, 0.0),
            busiest_thread_s={"engine": time.thread_time() - thread0},  # this loop's thread
            gpu_busy_pct=gpu.pct,
        )
        return RunResult(name, n, max_tokens, wall, list(results.values()), cpu, steps, step_s)

    def run_single(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        eos_ids: Sequence[int],
        deadline_s: float,
    ) -> RunResult:
        """Each prompt through mlx_lm.stream_generate, one after the other."""
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_logits_processors

        bias = {int(e): -100.0 for e in eos_ids}
        results = [RequestResult() for _ in prompts]
        cpu0, busy0 = time.process_time(), busy_cpu_seconds()
        gpu = GpuBusy().__enter__()
        start = time.perf_counter()
        try:
            for prompt, r in zip(prompts, results):
                if time.perf_counter() - start > deadline_s:
                    r.error = "cut by the overall deadline"
                    continue
                sent = last = time.perf_counter()
                for _ in stream_generate(
                    self.model,
                    self.tokenizer,
                    list(prompt),
                    max_tokens=max_tokens,
                    logits_processors=make_logits_processors(logit_bias=bias),
                ):
                    now = time.perf_counter()
                    if r.chunks == 0:
                        r.ttft_s = now - sent
                    else:
                        r.itl_s.append(now - last)
                    last = now
                    r.chunks += 1
            wall = time.perf_counter() - start
        finally:
            gpu.__exit__()
        engine_s = time.process_time() - cpu0
        cpu = CpuUse(
            server_s={"engine": engine_s}, other_s=max(busy_cpu_seconds() - busy0 - engine_s, 0.0), gpu_busy_pct=gpu.pct
        )
        return RunResult("stream_generate", 1, max_tokens, wall, results, cpu)
