"""Quantized KV cache (``kv_bits``): memory, decode speed and quality, side by side in one run.

    python -m bench.kv_quant --streams 1,8,32,64 --out BENCHMARKS.md

1. Memory: KV bytes per token, from the real nbytes of the caches the engine's
   batch (engine/batch_adapter.py) leaves for the prefix cache, per kv_bits, with
   float32 and bfloat16 activations, on the generated ``bench`` model and on SmolLM2.
2. Decode speed: tokens/s of the engine's batch at each ``--streams`` count on the
   ``bench`` model, kv_bits none / 8 / 4 one right after the other, after prompts of
   ``--context`` tokens (prefill tokens/s of those prompts alongside).
3. Quality on SmolLM2-135M-Instruct (the real model, float32): greedy answers to
   fixed prompts against full precision (identical tokens, first divergence), and
   perplexity of a fixed text (plus the mean KL divergence of each token's
   distribution from full precision's), the text fed in prefill chunks as the
   engine does.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import StopSequences
from mlx_lm.models.cache import BatchKVCache

from bench.report import SECTION_BEGIN, SECTION_END, machine_info, markdown_table, write_section
from engine.batch_adapter import Batch
from engine.quantized_cache import BatchQuantizedKVCache

log = logging.getLogger("bench.kv_quant")

SECTION = "kv-quant"
SETTINGS: tuple[int | None, ...] = (None, 8, 4)
MAX_STEPS = 100_000  # every loop below is bounded
# The row measured for bytes per token (an extracted row holds exactly its tokens).
MEMORY_PROMPT_TOKENS = 64

# Fixed chat prompts for greedy agreement (answers of a few dozen tokens).
QUALITY_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a prime number is.",
    "Write a haiku about the sea.",
    "How do plants make their food?",
    "What is the difference between weather and climate?",
    "Name three programming languages and what they are used for.",
    "Why is the sky blue?",
    "Summarize the story of Cinderella in two sentences.",
    "How many days are there in a leap year, and why?",
)

# The fixed text for perplexity (written for this benchmark; about 450 tokens).
PERPLEXITY_TEXT = """\
The history of the bicycle is a story of small improvements made by many people over more than a
century. The first machines, built in the early nineteenth century, had no pedals at all: riders sat
on a wooden frame between two wheels and pushed themselves along the ground with their feet. They
were called running machines or hobby horses, and for a few years they were fashionable among young
men in European cities, until the authorities banned them from the pavements.

Pedals arrived several decades later, attached directly to the front wheel. Because one turn of the
pedals meant one turn of the wheel, makers enlarged the front wheel to go faster, which led to the
high-wheeled bicycles that many people picture today. They were fast but dangerous: the rider sat
high above the ground, and a stone in the road could throw him forward over the handlebars.

The safety bicycle solved this problem. It had two wheels of equal size and a chain that carried the
force of the pedals to the rear wheel, so that gearing, not the size of the wheel, set the speed. Soon
afterwards the pneumatic tyre made riding far more comfortable, and within a few years the bicycle
had become cheap enough for ordinary workers. It changed daily life in ways that are easy to forget.
People could live farther from their work, visit neighbouring villages, and travel for pleasure on
their own schedule. Women in particular gained a new kind of independence, and clothing changed to
make riding easier.

Many of the techniques developed for bicycles, such as ball bearings, steel tubes and chain drives,
were later used in cars and aircraft. Today the bicycle is again seen as a modern machine: it is
quiet, it needs no fuel, and in crowded cities it is often the fastest way to cross town. Engineers
still refine its frame, its brakes and its gears, but the basic design of the safety bicycle has
hardly changed in more than a hundred years.
"""


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def label(bits: int | None) -> str:
    return "none" if bits is None else f"{bits}-bit"


def new_batch(model: Any, rows: int, bits: int | None, group: int, eos: Sequence[int] = (), chunk: int = 512) -> Batch:
    return Batch(model, list(eos), rows, rows, chunk, kv_bits=bits, kv_group_size=group)


def run_to_end(batch: Batch, want: int) -> list[Any]:
    """Step until ``want`` rows finished; their final responses."""
    finished: list[Any] = []
    for _ in range(MAX_STEPS):
        finished += [r for r in batch.step() if r.finish_reason is not None]
        if len(finished) >= want:
            return finished
    raise RuntimeError("the batch did not finish")


# ---------------------------------------------------------------- memory


def bytes_per_token(model: Any, bits: int | None, group: int, tokens: int = MEMORY_PROMPT_TOKENS) -> float:
    """KV bytes per token of one finished row's cache (exact: the extracted row holds no spare room)."""
    batch = new_batch(model, 1, bits, group)
    prompt = [(7 * i) % 200 + 10 for i in range(tokens)]
    batch.insert(prompt, 1, None, [], greedy, None, StopSequences([]))
    (done,) = run_to_end(batch, 1)
    cache = done.prompt_cache
    mx.eval([c.state for c in cache])
    return sum(c.nbytes for c in cache) / cache[0].offset


@dataclass
class MemoryRow:
    model: str
    dtype: str
    per_token: dict[int | None, float]


def memory_rows(models: dict[str, Any], group: int) -> list[MemoryRow]:
    rows = []
    for name, model in models.items():
        for dtype in (mx.float32, mx.bfloat16):
            model.set_dtype(dtype)
            per_token = {bits: bytes_per_token(model, bits, group) for bits in SETTINGS}
            rows.append(MemoryRow(name, str(dtype).removeprefix("mlx.core."), per_token))
            log.info("memory %s %s: %s", name, dtype, per_token)
        model.set_dtype(mx.float32)
    return rows


# ---------------------------------------------------------------- decode speed


@dataclass
class SpeedRow:
    streams: int
    bits: int | None
    decode_tok_s: float
    step_ms: float
    prefill_tok_s: float


def _prefilled(model: Any, streams: int, bits: int | None, group: int, context: int, steps: int) -> tuple[Batch, float]:
    """A batch of ``streams`` rows all decoding, and the prefill tokens/s it took to get there."""
    batch = new_batch(model, streams, bits, group)
    vocab = model.args.vocab_size
    for i in range(streams):
        prompt = [(31 * i + 7 * j) % (vocab - 10) + 10 for j in range(context)]
        batch.insert(prompt, steps + 4, None, [], greedy, None, StopSequences([]))
    start = batch.costs()
    for _ in range(MAX_STEPS):
        if batch.rows().decoding == streams:
            break
        batch.step()
    prefill = batch.costs().since(start)
    batch.step()  # a first decode step of the whole batch (new shapes) before timing
    mx.synchronize()
    return batch, prefill.prompt_tokens / prefill.prompt_s if prefill.prompt_s else float("nan")


def decode_speeds(model: Any, streams: int, group: int, context: int, rounds: int) -> list[SpeedRow]:
    """The three settings' batches prefilled, then timed one step each in turn, ``rounds``
    times: a load that comes and goes on a shared machine hits them all alike."""
    batches = {bits: _prefilled(model, streams, bits, group, context, rounds) for bits in SETTINGS}
    times: dict[int | None, list[float]] = {bits: [] for bits in SETTINGS}
    for _ in range(rounds):
        for bits, (batch, _) in batches.items():
            tic = time.perf_counter()
            batch.step()
            # step() returns with the next token's forward in flight: wait for it, so one
            # timing is one whole decode forward of this batch.
            mx.synchronize()
            times[bits].append(time.perf_counter() - tic)
    rows = []
    for bits, (_, prefill_tok_s) in batches.items():
        step_s = statistics.median(times[bits])
        rows.append(SpeedRow(streams, bits, streams / step_s, 1000 * step_s, prefill_tok_s))
    return rows


# ---------------------------------------------------------------- quality


@dataclass
class Agreement:
    bits: int
    # Share of full precision's tokens that the quantized answers repeat before they first differ
    # (after a divergence the two continue from different texts: later matches are chance).
    identical: float
    identical_answers: int
    first_divergence: list[int | None]


def answers(
    model: Any, prompts: list[list[int]], bits: int | None, group: int, eos: Sequence[int], n: int
) -> list[list[int]]:
    batch = new_batch(model, len(prompts), bits, group, eos)
    uids = [batch.insert(p, n, None, [], greedy, None, StopSequences([[t] for t in eos])) for p in prompts]
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    done = 0
    for _ in range(MAX_STEPS):
        for r in batch.step():
            tokens[r.uid].append(r.token)
            done += r.finish_reason is not None
        if done == len(prompts):
            return [tokens[uid] for uid in uids]
    raise RuntimeError("the batch did not finish")


def agreement(full: list[list[int]], quantized: list[list[int]], bits: int) -> Agreement:
    same = total = 0
    divergence: list[int | None] = []
    for f, q in zip(full, quantized):
        total += len(f)
        first = next((i for i, (a, b) in enumerate(zip(f, q)) if a != b), None)
        if first is None and len(f) != len(q):
            first = min(len(f), len(q))
        same += len(f) if first is None else first
        divergence.append(first)
    return Agreement(bits, same / total, sum(d is None for d in divergence), divergence)


@dataclass
class Perplexity:
    bits: int | None
    tokens: int
    perplexity: float
    kl_from_full: float  # mean over tokens, nats


def text_logprobs(model: Any, tokens: list[int], bits: int | None, group: int, chunk: int) -> mx.array:
    """Log-probabilities of every next token, the text fed in chunks through one batch row's cache."""
    layers = len(model.layers)
    cache = [BatchKVCache([0]) if bits is None else BatchQuantizedKVCache([0], group, bits) for _ in range(layers)]
    out = []
    for start in range(0, len(tokens) - 1, chunk):
        piece = mx.array([tokens[start : min(start + chunk, len(tokens) - 1)]])
        logits = model(piece, cache=cache)[0].astype(mx.float32)
        out.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        mx.eval(out[-1])
    return mx.concatenate(out)


def perplexities(model: Any, tokens: list[int], group: int, chunk: int) -> list[Perplexity]:
    targets = mx.array(tokens[1:])
    full = text_logprobs(model, tokens, None, group, chunk)
    rows = []
    for bits in SETTINGS:
        logprobs = full if bits is None else text_logprobs(model, tokens, bits, group, chunk)
        nll = -mx.take_along_axis(logprobs, targets[:, None], axis=-1).mean()
        kl = (mx.exp(full) * (full - logprobs)).sum(axis=-1).mean()
        rows.append(Perplexity(bits, len(tokens) - 1, math.exp(float(nll)), float(kl)))
    return rows


# ---------------------------------------------------------------- report


def render(
    memory: list[MemoryRow],
    speed: list[SpeedRow],
    agree: list[Agreement],
    ppl: list[Perplexity],
    args: argparse.Namespace,
    command: str,
) -> str:
    machine = machine_info()
    out = [
        SECTION_BEGIN.format(name=SECTION),
        "## Quantized KV cache (`kv_bits`): memory, speed, quality (2-core CPU)",
        "",
        f"{machine['CPU']}, {machine['cores']}, {machine['packages']}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Command: `{command}`",
        "",
        f"KV bytes per token from the caches' real nbytes (a {MEMORY_PROMPT_TOKENS}-token row out of the engine's "
        "batch, as the prefix cache keeps it), "
        f"kv_group_size {args.group_size}:",
        "",
    ]
    mem_rows = []
    for m in memory:
        full = m.per_token[None]
        cells = [m.model, m.dtype, f"{full:,.0f}"]
        for bits in SETTINGS[1:]:
            cells.append(f"{m.per_token[bits]:,.0f} ({m.per_token[bits] / full:.3f} ×)")
        mem_rows.append(cells)
    out += [markdown_table(["model", "activations", "full precision", "8-bit", "4-bit"], mem_rows), ""]

    out += [
        f"Decode on the generated `bench` model (float32, ~34M parameters), {args.context}-token prompts, "
        f"median of {args.rounds} decode steps per setting, the three settings' batches stepped in turn:",
        "",
    ]
    by = {(s.streams, s.bits): s for s in speed}
    speed_rows = []
    for streams in args.streams:
        full = by[(streams, None)]
        cells = [str(streams)]
        for bits in SETTINGS:
            s = by[(streams, bits)]
            ratio = "" if bits is None else f" ({s.decode_tok_s / full.decode_tok_s:.2f} ×)"
            cells.append(f"{s.decode_tok_s:,.1f}{ratio}")
        cells.append(" / ".join(f"{by[(streams, b)].step_ms:,.1f}" for b in SETTINGS))
        cells.append(" / ".join(f"{by[(streams, b)].prefill_tok_s:,.0f}" for b in SETTINGS))
        speed_rows.append(cells)
    header = ["streams", "tok/s none", "8-bit", "4-bit", "decode step ms none / 8 / 4", "prefill tok/s none / 8 / 4"]
    out += [markdown_table(header, speed_rows), ""]

    out += [
        f"Quality on SmolLM2-135M-Instruct (float32): greedy answers to {len(QUALITY_PROMPTS)} fixed chat prompts "
        f"(up to {args.new_tokens} tokens, EOS stops) against full precision's, and the perplexity of a fixed "
        f"{ppl[0].tokens + 1}-token text fed in {args.ppl_chunk}-token prefill chunks:",
        "",
    ]
    q_rows = []
    for p in ppl:
        a = next((a for a in agree if a.bits == p.bits), None)
        identical = "–" if a is None else f"{100 * a.identical:.1f} %"
        answers_same = "–" if a is None else f"{a.identical_answers} of {len(a.first_divergence)}"
        firsts = "–" if a is None else ", ".join("=" if d is None else str(d) for d in a.first_divergence)
        delta = "" if p.bits is None else f" ({100 * (p.perplexity / ppl[0].perplexity - 1):+.2f} %)"
        q_rows.append(
            [label(p.bits), identical, answers_same, firsts, f"{p.perplexity:.3f}{delta}", f"{p.kl_from_full:.5f}"]
        )
    header = [
        "kv_bits",
        "tokens before the first divergence",
        "identical answers",
        "first divergence per prompt (= none)",
        "perplexity",
        "mean KL from full, nats",
    ]
    out += [markdown_table(header, q_rows), "", SECTION_END.format(name=SECTION), ""]
    return "\n".join(out)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=_ints, default=[1, 8, 32, 64])
    p.add_argument("--context", type=int, default=32, help="prompt tokens per stream before decode is timed")
    p.add_argument("--rounds", type=int, default=5, help="timed decode steps per streams count and setting (median)")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument("--new-tokens", type=int, default=48, help="greedy answer length cap for the agreement")
    p.add_argument("--ppl-chunk", type=int, default=128, help="prefill chunk of the perplexity text")
    p.add_argument(
        "--smollm2",
        type=Path,
        default=None,
        help="converted SmolLM2 directory (default: convert it once into the bench cache)",
    )
    p.add_argument("--cache-dir", default=os.environ.get("MLX_SERVER_BENCH_CACHE", "~/.cache/mlx-server-bench"))
    p.add_argument("--out", type=lambda s: Path(s) if s else None, default=None, help="Markdown file to update")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    from bench.serving import resolve_model
    from deploy.demo_model import ensure_demo_model

    cache_dir = Path(args.cache_dir).expanduser()
    bench_dir, _ = resolve_model("bench", cache_dir)
    smol_dir = args.smollm2 or ensure_demo_model(cache_dir)
    bench_model = load(str(bench_dir))[0]
    smol_model, tokenizer = load(str(smol_dir))[:2]

    speed = []
    for streams in args.streams:
        speed += decode_speeds(bench_model, streams, args.group_size, args.context, args.rounds)
        log.info("decode %s", speed[-3:])

    eos = sorted(int(t) for t in tokenizer.eos_token_ids)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in QUALITY_PROMPTS
    ]
    full = answers(smol_model, prompts, None, args.group_size, eos, args.new_tokens)
    agree = []
    for bits in SETTINGS[1:]:
        agree.append(agreement(full, answers(smol_model, prompts, bits, args.group_size, eos, args.new_tokens), bits))
        log.info("agreement %s (full precision's answer lengths %s)", agree[-1], [len(f) for f in full])
    ppl = perplexities(smol_model, tokenizer.encode(PERPLEXITY_TEXT), args.group_size, args.ppl_chunk)
    log.info("perplexity %s", ppl)

    memory = memory_rows({"generated `bench`": bench_model, "SmolLM2-135M": smol_model}, args.group_size)

    command = "python -m bench.kv_quant " + " ".join(
        [
            f"--streams {','.join(map(str, args.streams))}",
            f"--context {args.context}",
            f"--rounds {args.rounds}",
            f"--new-tokens {args.new_tokens}",
            *([f"--smollm2 {args.smollm2}"] if args.smollm2 else []),
            *([f"--out {args.out}"] if args.out else []),
        ]
    )
    section = render(memory, speed, agree, ppl, args, command)
    print(section)
    if args.out:
        write_section(args.out, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
