"""`python -m bench.engine_probe MODEL_DIR`: where the engine's time goes, step by step.

No HTTP and no sockets: the engine's Scheduler driven in this process with
arrivals spread over steps (as a server sees a burst of clients: a few per
step), next to raw BatchGenerator with the whole burst inserted at once.
Every step's wall time is recorded with the shapes it ran (decode rows,
prefill rows x chunk tokens), so one-off costs of new shapes (kernel builds,
graph captures on CUDA) show up as slow steps. Each scenario runs twice: the
second run shows what stays after every shape has been seen once. Each
request's time to first token counts from its arrival (raw: the insert of the
whole burst), in milliseconds and in engine steps (steps do not depend on how
busy the machine is).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
import msgspec
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_logits_processors

from deploy.settings import Settings
from engine.core import Scheduler, SchedulerConfig
from ipc.messages import Generate, SamplingParams

DEFAULTS = Settings.model_construct()  # mlx-server's defaults for the limits a run does not set

EOS_IDS = (0, 2)


@dataclass
class Step:
    seconds: float
    decode_rows: int
    prefill_rows: int
    prefill_tokens: int


@dataclass
class FirstToken:
    seconds: float  # from the request's arrival
    steps: int  # engine steps from its arrival, the one that produced it included


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    return [[(97 * i + 13 * j + 5) % (vocab - 10) + 5 for j in range(length)] for i in range(n)]


def _shape(gen: BatchGenerator) -> tuple[int, int]:
    return len(gen._generation_batch), len(gen._prompt_batch)


def run_scheduler(
    model, prompts, max_tokens, arrivals_per_step, config
) -> tuple[float, int, list[Step], list[FirstToken]]:
    bias = {e: -100.0 for e in EOS_IDS}
    sched = Scheduler(model, config)
    pending = [
        Generate(
            request_id=f"r{i}",
            prompt_token_ids=p,
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=0.0, logit_bias=bias),
        )
        for i, p in enumerate(prompts)
    ]
    steps: list[Step] = []
    tokens = 0
    arrived: dict[str, tuple[float, int]] = {}
    first: list[FirstToken] = []
    start = time.perf_counter()
    while pending or sched.has_work():
        for _ in range(min(arrivals_per_step, len(pending))):
            request = pending.pop(0)
            arrived[request.request_id] = (time.perf_counter(), len(steps))
            sched.add(b"w", request)
        batch = sched.core.batch
        before_tokens = batch.costs().prompt_tokens
        tic = time.perf_counter()
        out = sched.step()
        dt = time.perf_counter() - tic
        rows = batch.rows()
        steps.append(Step(dt, rows.decoding, rows.prefilling, batch.costs().prompt_tokens - before_tokens))
        tokens += sum(len(d.token_ids) for ds in out.values() for d in ds)
        now = time.perf_counter()
        for d in (d for ds in out.values() for d in ds if d.token_ids and d.request_id in arrived):
            at, step = arrived.pop(d.request_id)
            first.append(FirstToken(now - at, len(steps) - step))
        sched.remember_finished()  # as the socket loop does, after sending
    return time.perf_counter() - start, tokens, steps, first


def run_raw(model, prompts, max_tokens, prefill_batch) -> tuple[float, int, list[Step], list[FirstToken]]:
    bias = {e: -100.0 for e in EOS_IDS}
    n = len(prompts)
    gen = BatchGenerator(
        model,
        completion_batch_size=max(n, prefill_batch),
        prefill_batch_size=prefill_batch,
        stop_tokens=[[e] for e in EOS_IDS],
    )
    gen.insert(
        prompts,
        max_tokens=[max_tokens] * n,
        logits_processors=[make_logits_processors(logit_bias=bias) for _ in prompts],
    )
    steps: list[Step] = []
    tokens, done = 0, 0
    first: list[FirstToken] = []
    seen: set[int] = set()
    start = time.perf_counter()
    while done < n:
        before_tokens = gen._counters.prompt_tokens
        tic = time.perf_counter()
        _, responses = gen.next()
        dt = time.perf_counter() - tic
        decode_rows, prefill_rows = _shape(gen)
        steps.append(Step(dt, decode_rows, prefill_rows, gen._counters.prompt_tokens - before_tokens))
        tokens += len(responses)
        done += sum(r.finish_reason is not None for r in responses)
        for r in responses:
            if r.uid not in seen:
                seen.add(r.uid)
                first.append(FirstToken(time.perf_counter() - start, len(steps)))
    gen.close()
    return time.perf_counter() - start, tokens, steps, first


def report(name: str, wall: float, tokens: int, steps: list[Step], first: list[FirstToken], slow_ms: float) -> None:
    times = [s.seconds * 1e3 for s in steps]
    ttft = sorted(f.seconds * 1e3 for f in first)
    to_first = sorted(f.steps for f in first)
    decode_only = [s.seconds * 1e3 for s in steps if not s.prefill_tokens]
    slow = [s for s in steps if s.seconds * 1e3 > slow_ms]
    print(
        f"{name}: {tokens / wall:,.0f} tok/s, {wall:.2f} s, {len(steps)} steps, step ms p50 "
        f"{statistics.median(times):.2f} max {max(times):.1f}; decode-only p50 "
        f"{statistics.median(decode_only) if decode_only else 0:.2f}; {len(slow)} steps > {slow_ms:g} ms "
        f"({sum(s.seconds for s in slow):.2f} s); TTFT ms p50 {statistics.median(ttft):.1f} "
        f"p95 {ttft[int(0.95 * (len(ttft) - 1))]:.1f}, steps to first token p50 {statistics.median(to_first):g} "
        f"max {to_first[-1]}"
    )
    for s in slow[:12]:
        print(
            f"    {s.seconds * 1e3:8.1f} ms  decode {s.decode_rows:3d}  prefill rows {s.prefill_rows:2d} "
            f"tokens {s.prefill_tokens}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=140)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--arrivals", default="64,8,3", help="requests added per step, one scenario each")
    p.add_argument("--prefill-batch", default="8,64", help="the engine's prefill_batch_size, one scenario each")
    p.add_argument("--slow-ms", type=float, default=50.0)
    p.add_argument(
        "--prompt-cache-bytes",
        type=int,
        default=0,
        help="the engine's prefix cache (0: off; the server's default is 2 GiB)",
    )
    p.add_argument(
        "--no-clear-cache",
        action="store_true",
        help="make mx.clear_cache a no-op (mlx-lm calls it after every prefill chunk) to see its cost",
    )
    args = p.parse_args()
    if args.no_clear_cache:
        mx.clear_cache = lambda: None
    model, tok = load(args.model)
    vocab = model.args.vocab_size if hasattr(model, "args") else 32000
    prompts = _prompts(args.streams, args.prompt_tokens, vocab)
    print(
        f"device {mx.default_device()}, {args.streams} streams, prompt {args.prompt_tokens}, "
        f"max_tokens {args.max_tokens}"
    )
    for rep in (1, 2):
        wall, tokens, steps, first = run_raw(model, prompts, args.max_tokens, args.streams)
        report(f"[{rep}] raw all-at-once", wall, tokens, steps, first, args.slow_ms)
        for pb in (int(x) for x in args.prefill_batch.split(",")):
            for per_step in (int(x) for x in args.arrivals.split(",")):
                limits = msgspec.structs.replace(
                    DEFAULTS.engine_config(),
                    max_batch_size=64,
                    prefill_batch_size=pb,
                    prompt_cache_bytes=args.prompt_cache_bytes,
                )
                config = SchedulerConfig(
                    eos_token_ids=EOS_IDS, vocab_size=vocab, context_length=1 << 17, **msgspec.structs.asdict(limits)
                )
                wall, tokens, steps, first = run_scheduler(model, prompts, args.max_tokens, per_step, config)
                name = f"[{rep}] engine prefill_batch {pb}, {per_step} arrivals/step"
                report(name, wall, tokens, steps, first, args.slow_ms)


if __name__ == "__main__":
    main()
