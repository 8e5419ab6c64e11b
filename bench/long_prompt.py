"""Long prompts: our prefill speed against mlx-lm's own, and the running streams meanwhile.

    python -m bench.long_prompt --model tiny --prompt-tokens 32768 --out BENCHMARKS.md

1. raw: mlx-lm in this process on the same model and prompt: ``stream_generate``
   with its own prefill step (2,048 tokens), and ``BatchGenerator`` with one row
   at the server's prefill step size (what our engine runs). Prefill tokens/s =
   prompt tokens / time to the first token.
2. ours alone: the same-length prompt (other ids: no prefix-cache hit) as token
   ids to /v1/completions with max_tokens 1; the request's whole time counts.
   Raw and ours take turns within each repeat, so both meet the same phase of
   whatever else the machine runs.
3. ours with ``--streams`` streams decoding: their inter-token gaps over a quiet
   window, then while the long prompt prefills (p50, p95, max), and the long
   prompt's prefill tokens/s meanwhile. Chunked prefill keeps them flowing.

Generated models are built with a 64k-token context. Every figure is the median
of ``--repeats`` runs, each with new prompt ids.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from bench.report import SECTION_BEGIN, SECTION_END, machine_info, markdown_table, write_section
from tests.integration.server import ServerProcess

SECTION = "long-prompt"
LONG_CONTEXT = 65536
REQUEST_TIMEOUT_S = 1800.0
QUIET_WINDOW_S = 2.0
SETTLE_S = 2.0  # streams started and decoding before the quiet window
STREAM_PROMPT_TOKENS = 16
# Plain byte-level ids of the generated tokenizer (no special or added tokens).
FIRST_ID, LAST_ID = 300, 600


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    last = min(LAST_ID, vocab - 1)
    return [rng.randrange(FIRST_ID, last) for _ in range(n)]


def resolve_model(name: str, cache_dir: Path) -> Path:
    if name not in ("tiny", "long", "bench"):
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {name}: no config.json there")
        return path
    from tests.model_factory import build_tiny_model

    out = cache_dir / f"{name}-ctx{LONG_CONTEXT}-seed0"
    if not (out / "model.safetensors").is_file():
        build_tiny_model(out, size=name, seed=0, context=LONG_CONTEXT)
    return out


# ---------------------------------------------------------------- raw mlx-lm


class RawPrefill:
    """mlx-lm on the model in this process: ``stream_generate`` (its default prefill step)
    and a one-row ``BatchGenerator`` at ``step`` tokens per chunk."""

    def __init__(self, model_dir: Path, n: int, step: int) -> None:
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_dir))
        self.vocab = self.model.args.vocab_size
        self.n, self.step = n, step
        # A GPU compiles kernels for each new shape on first use: not part of any timing.
        self.stream_generate(prompt_ids(min(n, 2 * step), 999, self.vocab))

    def stream_generate(self, ids: list[int]) -> float:
        """Prefill tokens/s of one prompt."""
        from mlx_lm.generate import stream_generate

        start = time.perf_counter()
        for _ in stream_generate(self.model, self.tokenizer, ids, max_tokens=1):
            break
        return len(ids) / (time.perf_counter() - start)

    def batch_generator(self, ids: list[int]) -> float:
        from mlx_lm.generate import BatchGenerator

        gen = BatchGenerator(self.model, completion_batch_size=1, prefill_batch_size=1, prefill_step_size=self.step)
        try:
            start = time.perf_counter()
            gen.insert([ids], max_tokens=[1])
            while not gen.next_generated():
                pass
            return len(ids) / (time.perf_counter() - start)
        finally:
            gen.close()


# ---------------------------------------------------------------- ours


def complete(base: str, ids: list[int]) -> float:
    """Seconds for a one-token completion of ``ids`` (prefill plus one decode step)."""
    body = {"model": "m", "prompt": ids, "max_tokens": 1, "temperature": 0}
    start = time.perf_counter()
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    r.raise_for_status()
    elapsed = time.perf_counter() - start
    if r.json()["usage"]["prompt_tokens"] != len(ids):
        raise RuntimeError("the server counted another prompt length")
    return elapsed


def stream(base: str, ids: list[int], no_eos: dict, stop: threading.Event, out: list[float]) -> None:
    """A streamed completion that runs until ``stop``; appends each chunk's arrival time to ``out``."""
    body = {"model": "m", "prompt": ids, "max_tokens": LONG_CONTEXT // 2, "temperature": 0, "stream": True}
    body["logit_bias"] = no_eos
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out.append(time.perf_counter())
            if stop.is_set():
                break


def gaps(arrivals: list[float], start: float, end: float) -> list[float]:
    return [b - a for a, b in zip(arrivals, arrivals[1:]) if start <= a and b <= end]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def with_streams(base: str, n: int, seed: int, vocab: int, streams: int, no_eos: dict) -> dict[str, Any]:
    stop = threading.Event()
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    threads = [
        threading.Thread(
            target=stream, args=(base, prompt_ids(STREAM_PROMPT_TOKENS, seed * 100 + i, vocab), no_eos, stop, a)
        )
        for i, a in enumerate(arrivals)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(SETTLE_S)
        quiet = (time.perf_counter(), time.perf_counter() + QUIET_WINDOW_S)
        time.sleep(QUIET_WINDOW_S)
        started = time.perf_counter()
        elapsed = complete(base, prompt_ids(n, seed, vocab))
        busy = (started, started + elapsed)
    finally:
        stop.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S)
    idle = [g for a in arrivals for g in gaps(a, *quiet)]
    during = [g for a in arrivals for g in gaps(a, *busy)]
    return {
        "prefill_tok_s": n / elapsed,
        "idle_ms": [1000 * pct(idle, q) for q in (0.5, 0.95)] + [1000 * max(idle, default=float("nan"))],
        "during_ms": [1000 * pct(during, q) for q in (0.5, 0.95)] + [1000 * max(during, default=float("nan"))],
        "tokens_during": len(during),
    }


def measure(model_dir: Path, n: int, repeats: int, streams: int, step: int, work: Path) -> dict[str, Any]:
    """Raw and ours, one after the other within each repeat (the same phase of
    whatever else the machine runs), then ours with streams decoding."""
    config = json.loads((model_dir / "config.json").read_text())
    vocab = config["vocab_size"]
    eos = config["eos_token_id"]
    no_eos = {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}
    raw = RawPrefill(model_dir, n, step)
    runs: dict[str, list[float]] = {"stream_generate": [], "batch_generator": [], "alone": []}
    server = ServerProcess(model_dir, work, "--prefill-step-size", str(step), workers=1)
    with server:
        complete(server.base_url, prompt_ids(min(n, 2 * step), 7, vocab))  # warm-up (a GPU's kernel compiles)
        for k in range(repeats):  # new ids for every run: no prefix cache helps
            runs["stream_generate"].append(raw.stream_generate(prompt_ids(n, 1000 + k, vocab)))
            runs["batch_generator"].append(raw.batch_generator(prompt_ids(n, 2000 + k, vocab)))
            runs["alone"].append(n / complete(server.base_url, prompt_ids(n, 3000 + k, vocab)))
        busy = [
            with_streams(server.base_url, n, 4000 + k, vocab, streams, no_eos) for k in range(repeats if streams else 0)
        ]
    out: dict[str, Any] = {name: statistics.median(values) for name, values in runs.items()}
    out["runs"] = runs
    if busy:
        out["with_streams"] = sorted(busy, key=lambda b: b["prefill_tok_s"])[len(busy) // 2]
        out["with_streams_runs"] = busy
    return out


# ---------------------------------------------------------------- report


def render(info: dict, args: argparse.Namespace, measured: dict, command: str) -> str:
    base = measured["stream_generate"]
    rows = [
        ["raw: mlx-lm `stream_generate` (prefill step 2,048)", f"{base:,.0f}", "1.00", ""],
        [f"raw: `BatchGenerator`, one row, prefill step {args.prefill_step_size}",
         f"{measured['batch_generator']:,.0f}", f"{measured['batch_generator'] / base:.2f}", ""],
        ["ours alone (HTTP, /v1/completions, max_tokens 1)", f"{measured['alone']:,.0f}",
         f"**{measured['alone'] / base:.2f}**", ""],
    ]  # fmt: skip
    busy = measured.get("with_streams")
    if busy:
        idle, during = busy["idle_ms"], busy["during_ms"]
        rows.append([
            f"ours with {args.streams} streams decoding", f"{busy['prefill_tok_s']:,.0f}",
            f"{busy['prefill_tok_s'] / base:.2f}",
            f"streams' gaps p50 / p95 / max: idle {idle[0]:.1f} / {idle[1]:.1f} / {idle[2]:.1f} ms, "
            f"during the prefill {during[0]:.1f} / {during[1]:.1f} / {during[2]:.1f} ms "
            f"({busy['tokens_during']} tokens)",
        ])  # fmt: skip
    machine = ", ".join(f"{k}: {v}" for k, v in info.items())
    return (
        SECTION_BEGIN.format(name=args.section) + "\n"
        f"{machine}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.prompt_tokens:,}-token prompts, "
        f"model {args.model} (context {LONG_CONTEXT:,}), median of {args.repeats}.\n\n"
        f"Command: `{command}`\n\n"
        + markdown_table(["prefill of one long prompt", "tokens/s", "÷ stream_generate", "running streams"], rows)
        + "\n"
        + SECTION_END.format(name=args.section)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.long_prompt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="tiny | long | bench (generated, 64k context) | a model directory")
    p.add_argument("--prompt-tokens", type=int, default=32768)
    p.add_argument("--streams", type=int, default=8, help="streams decoding while the long prompt prefills (0: none)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prefill-step-size", type=int, default=512, help="ours' --prefill-step-size (512: its default)")
    p.add_argument("--cache-dir", default="~/.cache/mlx-server-bench")
    p.add_argument("--out", default="", help="Markdown file whose long-prompt section to replace ('': print only)")
    p.add_argument("--json", default="", help="also write the measurements here")
    p.add_argument("--section", default=SECTION, help="the section of --out to replace")
    args = p.parse_args(argv)
    if min(args.prompt_tokens, args.repeats, args.prefill_step_size) < 1 or args.streams < 0:
        p.error("--prompt-tokens, --repeats and --prefill-step-size must be >= 1, --streams >= 0")
    model_dir = resolve_model(args.model, Path(args.cache_dir).expanduser())
    with tempfile.TemporaryDirectory(prefix="mlx-long-prompt-") as work:
        measured = measure(
            model_dir, args.prompt_tokens, args.repeats, args.streams, args.prefill_step_size, Path(work)
        )
    print(json.dumps(measured, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=2) + "\n", encoding="utf-8")
    if args.out:
        command = (
            f"python -m bench.long_prompt --model {args.model} --prompt-tokens {args.prompt_tokens} "
            f"--streams {args.streams} --repeats {args.repeats} --prefill-step-size {args.prefill_step_size} "
            f"--section {args.section} --out {args.out}"
        )
        write_section(Path(args.out), args.section, render(machine_info(), args, measured, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
