"""Prefix cache, chunked prefill and memory, measured on our server.

    python -m bench.scenarios --model tiny --out BENCHMARKS.md

1. Prefix cache: TTFT of a request with a ~2,000-token system prompt, then of a
   second request that shares that prefix (different question); ratio.
2. Chunked prefill: running streams' inter-token latency p95 while idle vs
   while a ~4,000-token prompt arrives; ratio.
3. Memory: engine active/peak memory (from /v1/mlx/status) and the RSS of each
   gunicorn worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from bench.report import SECTION_BEGIN, SECTION_END, machine_info, markdown_table, write_section
from tests.integration.server import ServerProcess
from tests.model_factory import build_tiny_model

SECTION = "scenarios"
REQUEST_TIMEOUT_S = 300.0
# Running streams are closed after each round; this only has to outlast one.
STREAM_MAX_TOKENS = 1500
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing".split()


def long_text(words: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(words))


def stream_chat(
    base: str, messages: list[dict], max_tokens: int, no_eos: dict, stop: threading.Event | None = None
) -> dict:
    """One streamed chat: TTFT, token arrival times, usage. Setting ``stop``
    closes the stream after the next chunk (the server aborts the request)."""
    payload = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": no_eos,
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    usage: dict = {}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=REQUEST_TIMEOUT_S) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if stop is not None and stop.is_set():
                break
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    return {"ttft": arrivals[0] - start if arrivals else None, "arrivals": arrivals, "usage": usage}


def prefix_cache(base: str, no_eos: dict, prefix_words: int) -> dict:
    system = {"role": "system", "content": long_text(prefix_words, seed=1)}
    first = stream_chat(base, [system, {"role": "user", "content": "first question?"}], 8, no_eos)
    second = stream_chat(base, [system, {"role": "user", "content": "another one entirely?"}], 8, no_eos)
    return {
        "prompt_tokens": first["usage"]["prompt_tokens"],
        "cached_tokens": second["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0),
        "ttft_first_ms": first["ttft"] * 1000,
        "ttft_second_ms": second["ttft"] * 1000,
        "ratio": second["ttft"] / first["ttft"],
    }


def _gaps(arrivals: list[float], start: float, end: float) -> list[float]:
    return [b - a for a, b in zip(arrivals, arrivals[1:]) if start <= a and b <= end]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 20 else max(values)


def chunked_prefill(base: str, no_eos: dict, streams: int, long_words: int, rounds: int) -> dict:
    """ITL p95 of running streams: a quiet window, then while a long prompt
    prefills; ``rounds`` times (a different long prompt each: no cache hit),
    gaps pooled over the rounds."""
    quiet_gaps: list[float] = []
    busy_gaps: list[float] = []
    per_round: list[dict] = []
    for round_no in range(rounds):
        quiet, busy, big = _prefill_round(base, no_eos, streams, long_words, seed=3 + round_no)
        quiet_gaps += quiet
        busy_gaps += busy
        per_round.append(
            {
                "long_prompt_tokens": big["usage"]["prompt_tokens"],
                "long_prompt_ttft_ms": big["ttft"] * 1000,
                "ratio": p95(busy) / p95(quiet) if busy and quiet else float("nan"),
                "windows": big["windows"],  # perf_counter: the monotonic clock every process shares
            }
        )
    ratios = [r["ratio"] for r in per_round]
    return {
        "streams": streams,
        "rounds": rounds,
        "long_prompt_tokens": per_round[0]["long_prompt_tokens"],
        "long_prompt_ttft_ms": statistics.median(r["long_prompt_ttft_ms"] for r in per_round),
        "itl_p95_idle_ms": p95(quiet_gaps) * 1000,
        "itl_p95_during_prefill_ms": p95(busy_gaps) * 1000 if busy_gaps else float("nan"),
        "ratio": p95(busy_gaps) / p95(quiet_gaps) if busy_gaps else float("nan"),
        "round_ratio_min": min(ratios),
        "round_ratio_max": max(ratios),
        "per_round": per_round,
    }


def _prefill_round(base: str, no_eos: dict, streams: int, long_words: int, seed: int) -> tuple[list, list, dict]:
    """Streams decode; a quiet window; a long prompt arrives. The streams are
    closed once its first token is out. Returns (quiet gaps, busy gaps, the long request)."""
    results: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()

    def runner(i: int) -> None:
        r = stream_chat(base, [{"role": "user", "content": f"stream {i}"}], STREAM_MAX_TOKENS, no_eos, stop)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # all streams decoding
    quiet = (time.perf_counter(), time.perf_counter() + 2.0)
    time.sleep(2.0)
    long_prompt = [{"role": "user", "content": long_text(long_words, seed=seed)}]
    started = time.perf_counter()
    big = stream_chat(base, long_prompt, 4, no_eos)
    busy = (started, started + big["ttft"])
    stop.set()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    if len(results) != streams:
        raise RuntimeError(f"{streams - len(results)} streams did not end")
    quiet_gaps = [g for r in results for g in _gaps(r["arrivals"], *quiet)]
    busy_gaps = [g for r in results for g in _gaps(r["arrivals"], *busy)]
    big["windows"] = {"quiet": quiet, "busy": busy}
    return quiet_gaps, busy_gaps, big


def memory(server: ServerProcess) -> dict:
    status = httpx.get(f"{server.base_url}/v1/mlx/status", timeout=10).json()["memory"]
    workers = [
        p for p in server.process_tree() if "gunicorn" in " ".join(p.cmdline()) and p.parent().pid != server.proc.pid
    ]
    return {
        "engine_active_mb": status["active_bytes"] / 1e6,
        "engine_peak_mb": status["peak_bytes"] / 1e6,
        "worker_rss_mb": [round(p.memory_info().rss / 1e6, 1) for p in workers],
    }


def render(info: dict, cache: dict, prefill: dict, mem: dict, command: str, args: argparse.Namespace) -> str:
    rows = [
        ["prefix cache: TTFT first / second request (shared system prompt)",
         f"{cache['ttft_first_ms']:.1f} ms / {cache['ttft_second_ms']:.1f} ms",
         f"**{cache['ratio']:.2f}** (target ≤ 0.25); {cache['cached_tokens']} of {cache['prompt_tokens']} "
         "prompt tokens from the cache"],
        [f"chunked prefill: running streams' ITL p95, idle / while a {prefill['long_prompt_tokens']}-token "
         "prompt prefills",
         f"{prefill['itl_p95_idle_ms']:.1f} ms / {prefill['itl_p95_during_prefill_ms']:.1f} ms",
         f"**{prefill['ratio']:.2f}** (target ≤ 2; rounds {prefill['round_ratio_min']:.2f}-"
         f"{prefill['round_ratio_max']:.2f}); {prefill['streams']} streams; gaps of {prefill['rounds']} rounds pooled; "
         f"the long prompt's TTFT {prefill['long_prompt_ttft_ms']:.0f} ms (median); "
         f"prefill_step_size {args.prefill_step_size}"],
        ["engine memory: active / peak (after the runs, prefix cache included)",
         f"{mem['engine_active_mb']:.1f} MB / {mem['engine_peak_mb']:.1f} MB", ""],
        ["frontend worker RSS", ", ".join(f"{v} MB" for v in mem["worker_rss_mb"]), "each gunicorn worker"],
    ]  # fmt: skip
    machine = ", ".join(f"{k}: {v}" for k, v in info.items())
    return (
        SECTION_BEGIN.format(name=SECTION) + "\n"
        f"## Prefix cache, chunked prefill, memory ({args.model} model)\n\n"
        f"{machine}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.\n\n"
        f"Command: `{command}`\n\n"
        + markdown_table(["scenario", "measured", "ratio / notes"], rows)
        + "\n"
        + SECTION_END.format(name=SECTION)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--prefix-words", type=int, default=715, help="~2,000 tokens with the generated tokenizer")
    p.add_argument("--long-words", type=int, default=1390, help="~3,900 tokens with the generated tokenizer")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="long prompts, one per round; ITL gaps pooled")
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument(
        "--out", type=lambda s: Path(s) if s else None, help="Markdown file to update ('' or none: print only)"
    )
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mlx-scenarios-"))
    model = build_tiny_model(work / f"{args.model}-model", size=args.model)
    eos = json.loads((model / "config.json").read_text())["eos_token_id"]
    no_eos = {str(t): -100 for t in eos}
    # Room for the long prompt: the generated model's context is 4096 tokens.
    server = ServerProcess(model, work, "--prefill-step-size", str(args.prefill_step_size), workers=2)
    with server:
        cache = prefix_cache(server.base_url, no_eos, args.prefix_words)
        prefill = chunked_prefill(server.base_url, no_eos, args.streams, args.long_words, args.rounds)
        mem = memory(server)
    print(json.dumps({"prefix_cache": cache, "chunked_prefill": prefill, "memory": mem}, indent=2))
    if args.out:
        command = (
            f"python -m bench.scenarios --model {args.model} --streams {args.streams} --rounds {args.rounds} "
            f"--prefill-step-size {args.prefill_step_size} --out {args.out}"
        )
        write_section(args.out, SECTION, render(machine_info(), cache, prefill, mem, command, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
