"""`python -m bench.serving`: the same streaming load against each target, one after the other.

Targets: ours (`python -m deploy.cli`), mlx_lm (`python -m mlx_lm server`), raw
(BatchGenerator in this process, the ceiling) and raw_nobias (raw without the
per-request logit-bias processors). Every target gets, per concurrency N: a
warm-up of N streams (new batch sizes pay one-off costs), then N clients x
--rounds requests of exactly --max-tokens tokens each (eos banned by logit_bias).
Progress goes to stderr; the report to stdout, --out and --chart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from bench import report
from bench.loadgen import LoadSpec, run_load
from bench.prompts import Prompt, make_prompts
from bench.servers import (
    ServerProcess,
    ServerSpec,
    busy_cpu_seconds,
    cpu_delta,
    mlx_lm_spec,
    ours_spec,
    wait_for_quiet,
)
from bench.stats import CpuUse, RunResult, median_run, summarize, summarize_repeats

log = logging.getLogger("bench.serving")

HTTP_TARGETS = ("ours", "mlx_lm")
RAW_TARGETS = ("raw", "raw_nobias")
ALL_TARGETS = HTTP_TARGETS + RAW_TARGETS
GENERATED_SIZES = ("tiny", "bench")
EOS_BIAS = -100.0  # the OpenAI minimum: the token is never sampled
QUIET_CORES = 0.25  # what wait_for_quiet accepts as an idle machine


class Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(self._end - time.monotonic(), 0.0)

    def check(self) -> None:
        if self.remaining() <= 0:
            raise TimeoutError("overall deadline (--deadline-s) reached")


@dataclass(frozen=True)
class Load:
    concurrency: list[int]
    max_tokens: int
    prompt_tokens: int
    rounds: int
    repeats: int
    warmup_tokens: int
    request_timeout_s: float
    ramp_s: float
    quiet_wait_s: float


def _settle(load: Load, deadline: Deadline) -> None:
    """Before a timed run: let other jobs on the machine finish, within limits."""
    if load.quiet_wait_s <= 0:
        return
    cores = wait_for_quiet(min(load.quiet_wait_s, deadline.remaining()), threshold_cores=QUIET_CORES)
    if cores > QUIET_CORES:
        log.warning("machine still busy (%.2f cores used by others); measuring anyway", cores)


def _csv_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 1,8,32")
    return values


def _targets(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(ALL_TARGETS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown targets {unknown}; choose from {','.join(ALL_TARGETS)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="tiny | bench (generated, cached) | a model directory")
    p.add_argument("--concurrency", type=_csv_ints, default=_csv_ints("1,8,32,64"), help="comma-separated")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request, exactly (eos is banned)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="templated prompt length, exact")
    p.add_argument("--targets", type=_targets, default=_targets("ours,mlx_lm,raw"),
                   help=f"comma-separated, run in this order: {','.join(ALL_TARGETS)}")
    # 3 rounds: one round of the tiny model lasts well under a second, too short to measure steadily.
    p.add_argument("--rounds", type=int, default=3, help="requests per client, one after the other")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point; the table shows the median")
    p.add_argument("--warmup-tokens", type=int, default=32, help="max_tokens of the warm-up requests")
    p.add_argument("--ramp-s", type=float, default=0.0, help="spread client starts over this long (0: burst)")
    p.add_argument("--quiet-wait-s", type=float, default=30.0,
                   help="before each timed run, wait up to this long for the machine to be idle (0: don't)")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--start-timeout-s", type=float, default=300.0, help="per server, until /v1/models answers")
    p.add_argument("--deadline-s", type=float, default=1800.0, help="the whole benchmark; later runs are skipped")
    p.add_argument("--ours-args", default="", help="extra flags for deploy.cli, e.g. '--workers 2 --threads 32'")
    p.add_argument("--mlx-lm-args", default="", help="extra flags for mlx_lm server")
    p.add_argument("--out", default="BENCHMARKS.md", help="Markdown file to update ('' for none)")
    p.add_argument("--section", default=None, help="section name in --out (default: from the model)")
    p.add_argument("--chart", default="bench/throughput.png", help="PNG to write ('' for none)")
    p.add_argument("--json", default="", help="also dump every request's measurements here")
    p.add_argument("--cache-dir", default=os.environ.get("MLX_SERVER_BENCH_CACHE", "~/.cache/mlx-server-bench"))
    p.add_argument("--log-dir", default="", help="server logs (default: CACHE_DIR/logs)")
    args = p.parse_args(argv)
    if min(args.max_tokens, args.rounds, args.repeats, args.warmup_tokens) < 1:
        p.error("--max-tokens, --rounds, --repeats and --warmup-tokens must be >= 1")
    return args


def resolve_model(name: str, cache_dir: Path) -> tuple[Path, str]:
    """(model directory, label for the report). Generated models are built once and reused."""
    if name not in GENERATED_SIZES:
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {name}: no config.json there")
        return path, path.name
    from tests.model_factory import build_tiny_model  # the repo's generator; run from the repo root

    out = cache_dir / f"{name}-seed0"
    if not (out / "model.safetensors").is_file():
        log.info("building the %s model into %s", name, out)
        build_tiny_model(out, size=name, seed=0)
    return out, f"generated {name}"


def eos_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    ids = config.get("eos_token_id")
    found = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return sorted(int(i) for i in found)


def group_runs(runs: Sequence[RunResult]) -> list[list[RunResult]]:
    """Repeats of the same (target, concurrency) together, in the order first run."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.target, r.concurrency), []).append(r)
    return list(groups.values())


def _log_run(run: RunResult) -> None:
    s = summarize(run)
    log.info("%s x%d: %.0f tok/s, TTFT p50 %.1f ms, errors %d, retries %d",
             s.target, s.concurrency, s.tokens_per_s, s.ttft_p50_ms, s.errors, s.retries)  # fmt: skip


def _split(prompts: list[Prompt], clients: int) -> list[list[Prompt]]:
    return [prompts[i::clients] for i in range(clients)]


def run_http_target(
    spec: ServerSpec, load: Load, tokenizer: Any, bias: dict[int, float], log_dir: Path, deadline: Deadline,
    start_timeout_s: float, runs: list[RunResult],
) -> None:  # fmt: skip
    """Append each timed run to `runs` as it ends, so a later failure keeps the earlier ones."""
    with ServerProcess(spec, log_dir) as server:
        log.info("%s: starting on port %d (log %s)", spec.name, server.port, server.log_path)
        model_field = server.wait_ready(min(start_timeout_s, deadline.remaining()))
        for n in load.concurrency:
            deadline.check()
            warm = LoadSpec(model_field, min(load.warmup_tokens, load.max_tokens), bias, load.request_timeout_s,
                            load.ramp_s)  # fmt: skip
            results, _ = run_load(
                server.base_url, warm, _split(make_prompts(tokenizer, n, load.prompt_tokens, f"warm-{n}"), n),
                deadline.remaining(),
            )  # fmt: skip
            if not any(r.ok for r in results):
                raise RuntimeError(f"every warm-up request failed, e.g. {results[0].error}\n{server.log_tail()}")
            timed = LoadSpec(model_field, load.max_tokens, bias, load.request_timeout_s, load.ramp_s)
            for k in range(load.repeats):
                # New prompts per repeat: a prefix cache must not serve one repeat from another.
                prompts = make_prompts(tokenizer, n * load.rounds, load.prompt_tokens, f"run-{n}-{k}")
                _settle(load, deadline)
                before, cpu0, busy0 = server.cpu_seconds(), time.process_time(), busy_cpu_seconds()
                results, wall = run_load(server.base_url, timed, _split(prompts, n), deadline.remaining())
                cpu = CpuUse(client_s=time.process_time() - cpu0, server_s=cpu_delta(before, server.cpu_seconds()))
                cpu.other_s = max(busy_cpu_seconds() - busy0 - cpu.client_s - sum(cpu.server_s.values()), 0.0)
                runs.append(RunResult(spec.name, n, load.max_tokens, wall, results, cpu))
                _log_run(runs[-1])


def run_raw_target(
    name: str, model_dir: Path, load: Load, tokenizer: Any, eos: list[int], deadline: Deadline,
    runs: list[RunResult],
) -> None:  # fmt: skip
    from bench.raw import RawEngine

    engine = RawEngine(model_dir)
    bias = name == "raw"
    for n in load.concurrency:
        deadline.check()
        # Same number of streams as the timed HTTP runs: rounds run one after the other.
        warm = [p.ids for p in make_prompts(tokenizer, n, load.prompt_tokens, f"warm-{n}")]
        engine.run(warm, min(load.warmup_tokens, load.max_tokens), eos, bias, deadline.remaining())
        for k in range(load.repeats):
            prompts = make_prompts(tokenizer, n * load.rounds, load.prompt_tokens, f"run-{n}-{k}")
            _settle(load, deadline)
            parts = [engine.run([p.ids for p in prompts[r::load.rounds]], load.max_tokens, eos, bias,
                                deadline.remaining(), name) for r in range(load.rounds)]  # fmt: skip
            merged = RunResult(
                name, n, load.max_tokens, sum(p.wall_s for p in parts), [r for p in parts for r in p.requests],
                CpuUse(server_s={"engine": sum(p.cpu.server_s["engine"] for p in parts)},
                       other_s=sum(p.cpu.other_s for p in parts)),
            )  # fmt: skip
            runs.append(merged)
            _log_run(merged)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    deadline = Deadline(args.deadline_s)
    cache_dir = Path(args.cache_dir).expanduser()
    log_dir = Path(args.log_dir).expanduser() if args.log_dir else cache_dir / "logs"
    model_dir, model_label = resolve_model(args.model, cache_dir)

    from transformers import AutoTokenizer  # what both servers use for the chat template

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos = eos_ids(model_dir, tokenizer)
    bias = {e: EOS_BIAS for e in eos}
    load = Load(args.concurrency, args.max_tokens, args.prompt_tokens, args.rounds, args.repeats,
                args.warmup_tokens, args.request_timeout_s, args.ramp_s, args.quiet_wait_s)  # fmt: skip
    ours_extra, mlx_extra = shlex.split(args.ours_args), shlex.split(args.mlx_lm_args)
    specs = {
        "ours": ours_spec(model_dir, ours_extra),
        "mlx_lm": mlx_lm_spec(model_dir, max(args.concurrency), mlx_extra),
    }

    runs: list[RunResult] = []
    failures: dict[str, str] = {}
    for target in args.targets:
        if deadline.remaining() <= 0:
            failures[target] = "skipped: overall deadline reached"
            continue
        log.info("target %s", target)
        try:
            if target in RAW_TARGETS:
                run_raw_target(target, model_dir, load, tokenizer, eos, deadline, runs)
            else:
                run_http_target(specs[target], load, tokenizer, bias, log_dir, deadline, args.start_timeout_s, runs)
        except Exception as exc:  # one target failing must not lose the others' numbers
            log.exception("target %s failed", target)
            failures[target] = f"{type(exc).__name__}: {exc}"

    summaries = [summarize_repeats(group) for group in group_runs(runs)]
    print(report.terminal_report(summaries, failures))
    _write_outputs(args, summaries, failures, runs, model_label, eos, specs)
    return 1 if failures or not runs else 0


def _write_outputs(
    args: argparse.Namespace, summaries: list, failures: dict[str, str], runs: list[RunResult], model_label: str,
    eos: list[int], specs: dict[str, ServerSpec],
) -> None:  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs]), encoding="utf-8")
    title = f"{model_label}, {args.prompt_tokens}-token prompts, {args.max_tokens} tokens per stream"
    chart_rel = None
    if args.chart and summaries:
        chart = Path(args.chart)
        report.write_chart(chart, summaries, title)
        if args.out:
            chart_rel = os.path.relpath(chart.resolve(), Path(args.out).resolve().parent)
    if not args.out:
        return
    settings = {
        "load": f"{', '.join(map(str, args.concurrency))} concurrent streaming clients x {args.rounds} request(s); "
        f"temperature 0; eos ids {eos} banned with logit_bias {EOS_BIAS:g}; warm-up of the same size first "
        f"({args.warmup_tokens} tokens); "
        + (f"client starts spread over {args.ramp_s:g} s" if args.ramp_s else "all clients start at once"),
        "targets": ", ".join(
            f"{t} ({specs[t].settings['flags']})" if t in specs else t for t in args.targets
        ),
        "columns": "tok/s = tokens streamed / wall time of the run; TTFT = request sent to first content chunk; "
        "ITL = gap between content chunks as the client reads them (chunks read together give 0); "
        "short = finished with fewer tokens than asked; retries = connections reset before any response, "
        "sent again (at most 2, as the openai SDK); "
        "cores = CPU seconds / wall seconds (client = this load generator; server = all its processes; "
        "other = everything else on the machine, which should be near 0)",
    }
    notes = tuple(
        f"{r.target} at {r.concurrency} stream(s), server CPU by process: "
        + ", ".join(f"{label} {secs / r.wall_s:.2f} cores" for label, secs in sorted(r.cpu.server_s.items()))
        for r in (median_run(group) for group in group_runs(runs))
        if len(r.cpu.server_s) > 1 and r.wall_s > 0
    )
    info = report.SectionInfo(
        name=args.section or f"{args.model if args.model in GENERATED_SIZES else model_label}-{os.uname().machine}",
        title=title,
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python -m bench.serving " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        machine=report.machine_info(),
        settings=settings,
        chart=chart_rel,
        notes=notes,
    )
    report.write_section(Path(args.out), info.name, report.markdown_section(info, summaries, failures))


if __name__ == "__main__":
    sys.exit(main())
