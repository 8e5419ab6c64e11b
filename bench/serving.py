"""`python -m bench.serving`: the same streaming load against each target, one after the other.

Targets: ours (`python -m deploy.cli`), mlx_lm (`python -m mlx_lm server`), raw
(BatchGenerator in this process, the ceiling) and raw_nobias (raw without the
per-request logit-bias processors). Every target gets, per concurrency N: a
warm-up of N streams (new batch sizes pay one-off costs), then N clients x
--rounds requests of exactly --max-tokens tokens each (eos banned by logit_bias),
through the API --api names (chat completions by default).
With --distributed-ranks N (N >= 2) both servers shard the model over N local
ranks (ring backend on 127.0.0.1): ours through its own distributed settings,
mlx_lm.server under mlx.launch; the in-process raw targets are skipped.
Progress goes to stderr; the report to stdout, --out and --chart.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.loadgen import PATHS, LoadSpec, run_load
from bench.prompts import Prompt, make_prompts
from bench.servers import (
    CHILD_GRACE_S,
    DISTRIBUTED_MODES,
    LOCAL_BACKENDS,
    GpuBusy,
    Profiler,
    ServerProcess,
    ServerSpec,
    Sharding,
    busiest_thread,
    busy_cpu_seconds,
    cpu_delta,
    mlx_lm_spec,
    ours_spec,
    wait_for_quiet,
)
from bench.stats import CpuUse, RunResult, median_run, run_from_dict, summarize, summarize_repeats

log = logging.getLogger("bench.serving")

HTTP_TARGETS = ("ours", "mlx_lm")
RAW_TARGETS = ("raw", "raw_nobias", "stream_generate")  # stream_generate: at 1 stream only
ALL_TARGETS = HTTP_TARGETS + RAW_TARGETS
GENERATED_SIZES = ("tiny", "bench")
# Architectures of the generated models: llama (tensor sharding only in mlx-lm),
# qwen2 (tensor and pipeline).
ARCHITECTURES = ("llama", "qwen2")
STATUS_TIMEOUT_S = 10.0  # ours' /v1/mlx/status, read before and after each timed run
EOS_BIAS = -100.0  # the OpenAI minimum: the token is never sampled
QUIET_CORES = 0.25  # what wait_for_quiet accepts as an idle machine
WARMUP_RETRY_WAIT_S = 5.0  # after a failed warm-up, before the next try
PREWARM_PREFILL_BATCH = 64  # ours' default prefill_batch_size
PREWARM_TOKENS = 4
DEADLINE_ERROR = "cut by the overall deadline"  # as bench.loadgen and bench.raw mark such requests


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
    warmup_tries: int = 1
    api: str = "chat"  # which API the HTTP targets are driven through (bench.loadgen.PATHS)


def _settle(load: Load, deadline: Deadline) -> None:
    """Before a timed run: collect this process's garbage (the run itself collects
    none: ``_collector_paused``), then let other jobs on the machine finish, within limits."""
    gc.collect()
    if load.quiet_wait_s <= 0:
        return
    cores = wait_for_quiet(min(load.quiet_wait_s, deadline.remaining()), threshold_cores=QUIET_CORES)
    if cores > QUIET_CORES:
        log.warning("machine still busy (%.2f cores used by others); measuring anyway", cores)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection in this process while a run is timed (``_settle`` runs one before).

    This process is the clients (and the raw targets' engine). A full collection
    walks every object it holds, the loaded model's and tokenizer's included:
    2-3 ms on a 2-core machine, a pause of the clients' that the server would be
    charged for. Mid-burst it also holds back the burst's last requests while the
    first are already being served (BENCHMARKS.md, "Burst TTFT")."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
    p.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default="llama",
        help="of a generated --model (qwen2 shards in both --distributed-mode values, llama only in tensor)",
    )
    p.add_argument(
        "--distributed-ranks",
        type=int,
        default=1,
        help="N >= 2: ours and mlx_lm each shard the model over N ranks on this machine "
        "(ring backend on 127.0.0.1; mlx_lm under mlx.launch); raw targets are skipped",
    )
    p.add_argument(
        "--distributed-mode",
        choices=DISTRIBUTED_MODES,
        default="tensor",
        help="with --distributed-ranks: tensor (every rank a slice of every layer) or pipeline (layers split)",
    )
    p.add_argument(
        "--distributed-backend",
        choices=LOCAL_BACKENDS,
        default="ring",
        help="with --distributed-ranks: ring (TCP on 127.0.0.1) or nccl (one NVIDIA GPU per rank)",
    )
    p.add_argument("--concurrency", type=_csv_ints, default=_csv_ints("1,8,32,64"), help="comma-separated")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request, exactly (eos is banned)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="templated prompt length, exact")
    p.add_argument(
        "--targets",
        type=_targets,
        default=_targets("ours,mlx_lm,raw"),
        help=f"comma-separated, run in this order: {','.join(ALL_TARGETS)}",
    )
    # 3 rounds: one round of the tiny model lasts well under a second, too short to measure steadily.
    p.add_argument("--api", choices=sorted(PATHS), default="chat", help="the API the HTTP targets are driven through")
    p.add_argument("--rounds", type=int, default=3, help="requests per client, one after the other")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point; the table shows the median")
    p.add_argument("--warmup-tokens", type=int, default=32, help="max_tokens of the warm-up requests")
    p.add_argument(
        "--warmup-tries",
        type=int,
        default=1,
        help="warm up again (after a pause) while some warm-up requests fail, up to this many times",
    )
    p.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="py-spy (if installed) records the engine process of each timed run here: "
        "ours' engine, mlx_lm's server, raw's own process",
    )
    p.add_argument(
        "--prewarm-sweep",
        action="store_true",
        help="before all targets, run every batch size 1..max concurrency once in-process "
        "(fills mlx's kernel cache on a GPU)",
    )
    p.add_argument("--ramp-s", type=float, default=0.0, help="spread client starts over this long (0: burst)")
    p.add_argument(
        "--quiet-wait-s",
        type=float,
        default=30.0,
        help="before each timed run, wait up to this long for the machine to be idle (0: don't)",
    )
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--start-timeout-s", type=float, default=300.0, help="per server, until /v1/models answers")
    p.add_argument("--deadline-s", type=float, default=1800.0, help="the whole benchmark; later runs are skipped")
    p.add_argument(
        "--ours-args", default="", help="extra flags for deploy.cli, e.g. '--workers 2 --worker-connections 64'"
    )
    p.add_argument("--mlx-lm-args", default="", help="extra flags for mlx_lm server")
    p.add_argument("--out", default="BENCHMARKS.md", help="Markdown file to update ('' for none)")
    p.add_argument("--section", default=None, help="section name in --out (default: from the model)")
    p.add_argument("--chart", default="bench/throughput.png", help="PNG to write ('' for none)")
    p.add_argument("--json", default="", help="also dump every request's measurements here")
    p.add_argument(
        "--replot",
        default="",
        metavar="JSON",
        help="run nothing: write --out's section and --chart again from a --json dump",
    )
    p.add_argument("--cache-dir", default=os.environ.get("MLX_SERVER_BENCH_CACHE", "~/.cache/mlx-server-bench"))
    p.add_argument("--log-dir", default="", help="server logs (default: CACHE_DIR/logs)")
    args = p.parse_args(argv)
    if args.api not in ("chat", "completions") and "mlx_lm" in args.targets:
        p.error(f"--api {args.api}: mlx_lm's server speaks only chat and completions; drop mlx_lm from --targets")
    if min(args.max_tokens, args.rounds, args.repeats, args.warmup_tokens) < 1:
        p.error("--max-tokens, --rounds, --repeats and --warmup-tokens must be >= 1")
    if args.distributed_ranks < 1:
        p.error("--distributed-ranks must be >= 1 (1: one process, no sharding)")
    return args


def sharding_of(args: argparse.Namespace) -> Sharding | None:
    """The sharding both servers get; None for one process."""
    if args.distributed_ranks < 2:
        return None
    return Sharding(args.distributed_ranks, args.distributed_mode, args.distributed_backend)


def resolve_model(name: str, cache_dir: Path, architecture: str = "llama") -> tuple[Path, str]:
    """(model directory, label for the report). Generated models are built once and reused."""
    if name not in GENERATED_SIZES:
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {name}: no config.json there")
        return path, path.name
    from tests.model_factory import build_tiny_model  # the repo's generator; run from the repo root

    # llama keeps the cache directory it always had; other architectures get their own.
    arch: dict[str, Any] = {} if architecture == "llama" else {"architecture": architecture}
    out = cache_dir / (f"{name}-seed0" if not arch else f"{name}-{architecture}-seed0")
    if not any(out.glob("*.safetensors")):
        log.info("building the %s %s model into %s", name, architecture, out)
        build_tiny_model(out, size=name, seed=0, **arch)
    ensure_weight_index(out)
    return out, f"generated {name}" + (f" ({architecture})" if arch else "")


def ensure_weight_index(model_dir: Path) -> None:
    """Write Hugging Face's model.safetensors.index.json where it is missing.

    mlx_lm.server's pipeline mode (mlx_lm.utils.sharded_load) reads it to find each
    rank's weight files and fails without it; a one-file model (as generated here)
    has none. It lists each tensor's file and changes nothing else."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return
    weight_map = {}
    for weights in sorted(model_dir.glob("*.safetensors")):
        with open(weights, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        weight_map.update({name: weights.name for name in header if name != "__metadata__"})
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2), encoding="utf-8")


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
    start_timeout_s: float, runs: list[RunResult], events: list[str], profile_dir: Path | None = None,
) -> None:  # fmt: skip
    """Append each timed run to `runs` as it ends, so a later failure keeps the earlier ones;
    anything worth a note in the report (failed warm-ups, processes left after the stop) to `events`."""
    with ExitStack() as stack:
        server = ServerProcess(spec, log_dir)
        stack.callback(_note_leftovers, server, events)  # runs after the stop below (last in, first out)
        stack.enter_context(server)
        log.info("%s: starting on port %d (log %s)", spec.name, server.port, server.log_path)
        model_field = server.wait_ready(min(start_timeout_s, deadline.remaining()))
        for n in load.concurrency:
            deadline.check()
            warm = LoadSpec(model_field, min(load.warmup_tokens, load.max_tokens), bias, load.request_timeout_s,
                            load.ramp_s, load.api)  # fmt: skip
            for attempt in range(1, load.warmup_tries + 1):
                results, _ = run_load(
                    server.base_url, warm, _split(make_prompts(tokenizer, n, load.prompt_tokens, f"warm-{n}"), n),
                    deadline.remaining(),
                )  # fmt: skip
                failed = [r for r in results if not r.ok]
                if not failed:
                    break
                # A first batch of a new size can stall the server for a while (kernel compiles on a
                # GPU); the warm-up is there to absorb that, so say so and warm up again.
                events.append(f"{spec.name} warm-up at {n} stream(s), try {attempt}: {len(failed)} of "
                              f"{len(results)} requests failed, e.g. `{failed[0].error}`")  # fmt: skip
                log.warning("%s", events[-1])
                if attempt == load.warmup_tries:
                    raise RuntimeError(f"warm-up failed {attempt} times, e.g. {failed[0].error}\n{server.log_tail()}")
                time.sleep(WARMUP_RETRY_WAIT_S)
            timed = LoadSpec(model_field, load.max_tokens, bias, load.request_timeout_s, load.ramp_s, load.api)
            for k in range(load.repeats):
                # New prompts per repeat: a prefix cache must not serve one repeat from another.
                prompts = make_prompts(tokenizer, n * load.rounds, load.prompt_tokens, f"run-{n}-{k}")
                _settle(load, deadline)
                threads0 = server.thread_seconds()
                before, cpu0, busy0 = server.cpu_seconds(), time.process_time(), busy_cpu_seconds()
                pid = next(iter(server.pids(spec.profile_label)), None) if profile_dir else None
                prof = Profiler(pid, profile_dir / f"{spec.name}-c{n}-r{k}.txt") if profile_dir else nullcontext()
                steps0 = engine_steps(server.base_url)
                with _collector_paused(), GpuBusy() as gpu, prof:
                    results, wall = run_load(server.base_url, timed, _split(prompts, n), deadline.remaining())
                steps1 = engine_steps(server.base_url)
                cpu = CpuUse(client_s=time.process_time() - cpu0, server_s=cpu_delta(before, server.cpu_seconds()))
                cpu.other_s = max(busy_cpu_seconds() - busy0 - cpu.client_s - sum(cpu.server_s.values()), 0.0)
                cpu.busiest_thread_s = busiest_thread(threads0, server.thread_seconds())
                cpu.gpu_busy_pct = gpu.pct
                cpu.gpu_busy_per_gpu = gpu.per_gpu if len(gpu.per_gpu) > 1 else []
                run = RunResult(spec.name, n, load.max_tokens, wall, results, cpu)
                if steps0 and steps1:
                    run.engine_steps, run.engine_step_s = steps1[0] - steps0[0], steps1[1] - steps0[1]
                if cut_by_deadline(run):
                    events.append(f"{spec.name} at {n} stream(s): a run cut short by --deadline-s, left out")
                    log.warning("%s", events[-1])
                    return
                runs.append(run)
                _log_run(runs[-1])


def _note_leftovers(server: ServerProcess, events: list[str]) -> None:
    """A server whose processes outlive its stop (a rank its supervisor missed) is a finding."""
    if server.leftovers:
        events.append(f"{server.spec.name}: {len(server.leftovers)} process(es) still running "
                      f"{CHILD_GRACE_S:g} s after the stop, killed: {'; '.join(server.leftovers)}")  # fmt: skip
        log.warning("%s", events[-1])


def engine_steps(base_url: str) -> tuple[int, float] | None:
    """(steps, their wall seconds) so far from ours' /v1/mlx/status; None from a
    server without it (mlx_lm)."""
    try:
        r = httpx.get(f"{base_url}/v1/mlx/status", timeout=STATUS_TIMEOUT_S)
        engine = r.json()["engine"] if r.status_code == 200 else {}
        return (engine["steps"], engine["step_seconds"]) if "steps" in engine else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def run_raw_target(
    name: str, model_dir: Path, load: Load, tokenizer: Any, eos: list[int], deadline: Deadline,
    runs: list[RunResult], profile_dir: Path | None = None,
) -> None:  # fmt: skip
    from bench.raw import RawEngine

    engine = RawEngine(model_dir)
    bias = name == "raw"
    for n in load.concurrency:
        deadline.check()
        if name == "stream_generate":
            if n == 1:
                _run_single(engine, load, tokenizer, eos, deadline, runs)
            continue
        # Same number of streams as the timed HTTP runs: rounds run one after the other.
        warm = [p.ids for p in make_prompts(tokenizer, n, load.prompt_tokens, f"warm-{n}")]
        engine.run(warm, min(load.warmup_tokens, load.max_tokens), eos, bias, deadline.remaining())
        for k in range(load.repeats):
            prompts = make_prompts(tokenizer, n * load.rounds, load.prompt_tokens, f"run-{n}-{k}")
            _settle(load, deadline)
            prof = Profiler(os.getpid(), profile_dir / f"{name}-c{n}-r{k}.txt") if profile_dir else nullcontext()
            with _collector_paused(), prof:
                parts = [engine.run([p.ids for p in prompts[r::load.rounds]], load.max_tokens, eos, bias,
                                    deadline.remaining(), name) for r in range(load.rounds)]  # fmt: skip
            merged = RunResult(
                name, n, load.max_tokens, sum(p.wall_s for p in parts), [r for p in parts for r in p.requests],
                CpuUse(server_s={"engine": sum(p.cpu.server_s["engine"] for p in parts)},
                       other_s=sum(p.cpu.other_s for p in parts),
                       busiest_thread_s={"engine": sum(p.cpu.busiest_thread_s.get("engine", 0.0) for p in parts)},
                       gpu_busy_pct=_weighted_gpu(parts)),
                sum(p.engine_steps for p in parts), sum(p.engine_step_s for p in parts),
            )  # fmt: skip
            if cut_by_deadline(merged):
                log.warning("%s at %d stream(s): a run cut short by --deadline-s, left out", name, n)
                return
            runs.append(merged)
            _log_run(merged)


def _run_single(
    engine: Any, load: Load, tokenizer: Any, eos: list[int], deadline: Deadline, runs: list[RunResult]
) -> None:
    """mlx-lm's single-request path: the ceiling for one stream's inter-token latency."""
    warm = [p.ids for p in make_prompts(tokenizer, 1, load.prompt_tokens, "warm-1")]
    engine.run_single(warm, min(load.warmup_tokens, load.max_tokens), eos, deadline.remaining())
    for k in range(load.repeats):
        prompts = make_prompts(tokenizer, load.rounds, load.prompt_tokens, f"run-1-{k}")
        _settle(load, deadline)
        with _collector_paused():
            result = engine.run_single([p.ids for p in prompts], load.max_tokens, eos, deadline.remaining())
        if cut_by_deadline(result):
            log.warning("stream_generate: a run cut short by --deadline-s, left out")
            return
        runs.append(result)
        _log_run(result)


def prewarm_sweep(model_dir: Path, load: Load, tokenizer: Any, eos: list[int], deadline: Deadline) -> float:
    """Every batch size from 1 to the largest concurrency once, in this process, before any target.

    On a GPU, mlx compiles kernels for each new shape on first use and keeps them
    in a cache on disk that later processes reuse. A server sees batch sizes that
    grow one arrival at a time and prefill batches of 1..64 prompts (ours'
    default); a step that compiles many new kernels can take seconds, long enough
    for a server's own liveness checks to give up. The sweep pays those compiles
    up front for every target alike, so the timed runs measure serving."""
    from bench.raw import RawEngine

    start = time.perf_counter()
    engine = RawEngine(model_dir)
    prompts = [p.ids for p in make_prompts(tokenizer, max(load.concurrency), load.prompt_tokens, "sweep")]
    for b in range(1, max(load.concurrency) + 1):
        deadline.check()
        engine.run(prompts[:b], PREWARM_TOKENS, eos, True, deadline.remaining(), "sweep",
                   min(b, PREWARM_PREFILL_BATCH))  # fmt: skip
    del engine
    return time.perf_counter() - start


def cut_by_deadline(run: RunResult) -> bool:
    """A run the overall deadline stopped measures the deadline, not the target."""
    return any(r.error == DEADLINE_ERROR for r in run.requests)


def _weighted_gpu(parts: Sequence[RunResult]) -> float | None:
    timed = [(p.cpu.gpu_busy_pct, p.wall_s) for p in parts if p.cpu.gpu_busy_pct is not None]
    wall = sum(w for _, w in timed)
    return sum(pct * w for pct, w in timed) / wall if timed and wall > 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    deadline = Deadline(args.deadline_s)
    cache_dir = Path(args.cache_dir).expanduser()
    log_dir = Path(args.log_dir).expanduser() if args.log_dir else cache_dir / "logs"
    model_dir, model_label = resolve_model(args.model, cache_dir, args.architecture)
    sharding = sharding_of(args)

    from transformers import AutoTokenizer  # what both servers use for the chat template

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos = eos_ids(model_dir, tokenizer)
    bias = {e: EOS_BIAS for e in eos}
    load = Load(args.concurrency, args.max_tokens, args.prompt_tokens, args.rounds, args.repeats,
                args.warmup_tokens, args.request_timeout_s, args.ramp_s, args.quiet_wait_s,
                args.warmup_tries, args.api)  # fmt: skip
    profile_dir = Path(args.profile) if args.profile else None
    events: list[str] = []
    ours_extra, mlx_extra = shlex.split(args.ours_args), shlex.split(args.mlx_lm_args)
    specs = {
        "ours": ours_spec(model_dir, ours_extra, sharding),
        "mlx_lm": mlx_lm_spec(model_dir, max(args.concurrency), mlx_extra, sharding),
    }

    runs: list[RunResult] = []
    failures: dict[str, str] = {}
    if args.prewarm_sweep:
        log.info("pre-warm sweep over batch sizes 1..%d", max(args.concurrency))
        secs = prewarm_sweep(model_dir, load, tokenizer, eos, deadline)
        events.append(f"pre-warm sweep (every batch size 1..{max(args.concurrency)} once, in the benchmark "
                      f"process, before all targets): {secs:.0f} s")  # fmt: skip
        log.info("%s", events[-1])
    for target in args.targets:
        if deadline.remaining() <= 0:
            failures[target] = "skipped: overall deadline reached"
            continue
        log.info("target %s", target)
        if target in RAW_TARGETS and sharding is not None:
            events.append(f"{target}: skipped, the model is sharded ({sharding.describe()}); {target} runs "
                          "one unsharded BatchGenerator in the benchmark process")  # fmt: skip
            log.warning("%s", events[-1])
            continue
        try:
            if target in RAW_TARGETS:
                run_raw_target(target, model_dir, load, tokenizer, eos, deadline, runs, profile_dir)
            else:
                run_http_target(specs[target], load, tokenizer, bias, log_dir, deadline, args.start_timeout_s, runs,
                                events, profile_dir)  # fmt: skip
        except Exception as exc:  # one target failing must not lose the others' numbers
            log.exception("target %s failed", target)
            failures[target] = f"{type(exc).__name__}: {exc}"

    summaries = [summarize_repeats(group) for group in group_runs(runs)]
    print(report.terminal_report(summaries, failures))
    _write_outputs(args, summaries, failures, runs, model_label, eos, specs, events)
    return 1 if failures or not runs else 0


def run_notes(runs: Sequence[RunResult]) -> tuple[str, ...]:
    """Per (target, concurrency), the median run's CPU by process, its busiest thread, GPU busy."""
    notes = []
    medians = [median_run(group) for group in group_runs(runs)]
    for r in medians:
        if r.wall_s <= 0:
            continue
        busiest = r.cpu.busiest_thread_s
        if len(r.cpu.server_s) <= 1 and not busiest and r.cpu.gpu_busy_pct is None:
            continue
        cells = []
        for label, secs in sorted(r.cpu.server_s.items()):
            cell = f"{label} {secs / r.wall_s:.2f} cores"
            if label in busiest:
                cell += f" (busiest thread {busiest[label] / r.wall_s:.2f})"
            cells.append(cell)
        each = r.cpu.gpu_busy_per_gpu
        gpu = "" if r.cpu.gpu_busy_pct is None else f"; GPU busy {r.cpu.gpu_busy_pct:.0f}%"
        if each:
            gpu = "; GPU busy " + " / ".join(f"{pct:.0f}%" for pct in each) + " (GPU 0, 1, ...)"
        step = (
            "" if r.engine_step_ms is None else f"; engine {r.engine_step_ms:.2f} ms per step ({r.engine_steps} steps)"
        )
        notes.append(f"{r.target} at {r.concurrency} stream(s), server CPU by process: {', '.join(cells)}{gpu}{step}")
    return tuple(notes) + engine_step_notes(medians)


def engine_step_notes(medians: Sequence[RunResult]) -> tuple[str, ...]:
    """Per concurrency, ours' engine time per step against raw's (median runs): the
    engine's own speed, without the HTTP clients' arrival spread in the run's wall time."""
    by_key = {(r.target, r.concurrency): r for r in medians}
    notes = []
    for (target, n), ours in sorted(by_key.items()):
        raw = by_key.get(("raw", n))
        if target != "ours" or raw is None or ours.engine_step_ms is None or raw.engine_step_ms is None:
            continue
        notes.append(
            f"engine time per step at {n} stream(s): ours {ours.engine_step_ms:.2f} ms, raw "
            f"{raw.engine_step_ms:.2f} ms (raw/ours {raw.engine_step_ms / ours.engine_step_ms:.2f})"
        )
    return tuple(notes)


def section_info(
    args: argparse.Namespace, runs: list[RunResult], model_label: str, eos: list[int], specs: dict[str, ServerSpec],
) -> report.SectionInfo:  # fmt: skip
    sharding = sharding_of(args)
    generated = args.model in GENERATED_SIZES
    settings = {
        "load": f"{', '.join(map(str, args.concurrency))} concurrent streaming clients x {args.rounds} request(s) "
        f"to {PATHS[args.api]}; "
        f"temperature 0; eos ids {eos} banned with logit_bias {EOS_BIAS:g}; warm-up of the same size first "
        f"({args.warmup_tokens} tokens); "
        + (f"client starts spread over {args.ramp_s:g} s" if args.ramp_s else "all clients start at once"),
        "targets": ", ".join(f"{t} ({specs[t].settings['flags']})" if t in specs else t for t in args.targets),
        "columns": "tok/s = tokens streamed / wall time of the run; TTFT = request sent to first content chunk; "
        "ITL = gap between content chunks as the client reads them (chunks read together give 0); "
        "short = finished with fewer tokens than asked; retries = connections reset before any response, "
        "sent again (at most 2, as the openai SDK); "
        "cores = CPU seconds / wall seconds (client = this load generator; server = all its processes; "
        "other = everything else on the machine, which should be near 0); "
        "busiest thread = CPU seconds of a process's busiest thread / wall seconds (near 1: that thread is the "
        "bottleneck); GPU busy = mean nvidia-smi utilization.gpu during the run",
    }
    return report.SectionInfo(
        name=args.section
        or f"{args.model if generated else model_label}"
        + (f"-{args.architecture}" if generated and args.architecture != "llama" else "")
        + f"-{os.uname().machine}"
        + ("" if args.api == "chat" else f"-{args.api}")
        + ("" if sharding is None else f"-{sharding.mode}{sharding.ranks}"),
        title=f"{model_label}, {args.prompt_tokens}-token prompts, {args.max_tokens} tokens per stream"
        + ("" if sharding is None else f", sharded: {sharding.describe()}"),
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python -m bench.serving " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        machine=report.machine_info(),
        settings=settings,
        notes=run_notes(runs),
    )


def render(
    info: report.SectionInfo, summaries: list, failures: dict[str, str], out: str, chart: str,
) -> None:  # fmt: skip
    """The chart (where matplotlib is there) and the section of `out`."""
    chart_rel = None
    if chart and summaries:
        if report.write_chart(Path(chart), summaries, info.title):
            if out:
                chart_rel = os.path.relpath(Path(chart).resolve(), Path(out).resolve().parent)
        else:
            log.warning("matplotlib is missing: no chart; draw it elsewhere with --replot and the --json dump")
    if out:
        section = report.markdown_section(replace(info, chart=chart_rel), summaries, failures)
        report.write_section(Path(out), info.name, section)


def _write_outputs(
    args: argparse.Namespace, summaries: list, failures: dict[str, str], runs: list[RunResult], model_label: str,
    eos: list[int], specs: dict[str, ServerSpec], events: Sequence[str] = (),
) -> None:  # fmt: skip
    info = section_info(args, runs, model_label, eos, specs)
    info = replace(info, notes=(*info.notes, *events))
    if args.json:
        dump = {"section": asdict(info), "failures": failures, "runs": [asdict(r) for r in runs],
                "events": list(events)}  # fmt: skip
        Path(args.json).write_text(json.dumps(dump), encoding="utf-8")
    render(info, summaries, failures, args.out, args.chart)


def replot(args: argparse.Namespace) -> int:
    """Section and chart again from a --json dump, measured elsewhere (no server runs)."""
    data = json.loads(Path(args.replot).read_text(encoding="utf-8"))
    runs = [run_from_dict(d) for d in data["runs"]]
    events = list(data.get("events", []))
    for run in (r for r in runs if cut_by_deadline(r)):
        events.append(f"{run.target} at {run.concurrency} stream(s): a run cut short by --deadline-s, left out")
    runs = [r for r in runs if not cut_by_deadline(r)]
    section = data["section"]
    info = report.SectionInfo(**{**section, "notes": (*run_notes(runs), *events)})
    if args.section:
        info = replace(info, name=args.section)
    summaries = [summarize_repeats(group) for group in group_runs(runs)]
    print(report.terminal_report(summaries, data.get("failures", {})))
    render(info, summaries, data.get("failures", {}), args.out, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
