"""Per-request measurements and their aggregation into one row of the report.

Pure code (no I/O, no clocks) so the unit tests can check the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace


@dataclass
class RequestResult:
    """What one streaming request measured. Times are seconds (perf_counter deltas)."""

    ttft_s: float | None = None  # request sent -> first content chunk
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    chunks: int = 0  # SSE chunks (or raw steps) that carried content
    usage_tokens: int | None = None  # usage.completion_tokens, when the target reports it
    retries: int = 0  # connections refused or reset before any response (see loadgen)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens(self) -> int:
        # usage counts tokens even when a chunk carries several (or none, for a
        # partial UTF-8 sequence); chunks are the fallback when there is no usage.
        return self.usage_tokens if self.usage_tokens is not None else self.chunks


@dataclass
class CpuUse:
    """CPU seconds spent during a run, split by who spent them."""

    client_s: float = 0.0  # the load generator (this process)
    server_s: dict[str, float] = field(default_factory=dict)  # process label -> seconds
    # Everything else on the machine: other people's jobs share these cores, and
    # a run they slowed down should be visible as such.
    other_s: float = 0.0
    # process label -> CPU seconds of its busiest single thread: a Python loop
    # near 1 core per wall second is the bottleneck, whatever its process total.
    busiest_thread_s: dict[str, float] = field(default_factory=dict)
    # Mean GPU utilization over the run (nvidia-smi's utilization.gpu, 0..100:
    # share of time a kernel was running); None where there is no NVIDIA GPU.
    gpu_busy_pct: float | None = None
    # The same for each GPU of the machine, by index (a sharded server's ranks), when more than one.
    gpu_busy_per_gpu: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    target: str
    concurrency: int
    max_tokens: int
    wall_s: float
    requests: list[RequestResult]
    cpu: CpuUse = field(default_factory=CpuUse)
    # Steps of the process holding the model during the run and their wall time:
    # ours' from /v1/mlx/status, raw's from its own loop; 0 where unknown (mlx_lm).
    engine_steps: int = 0
    engine_step_s: float = 0.0

    @property
    def engine_step_ms(self) -> float | None:
        return self.engine_step_s / self.engine_steps * 1000 if self.engine_steps else None


def run_from_dict(d: dict) -> RunResult:
    """The inverse of dataclasses.asdict for a RunResult (the --json dump)."""
    requests = [RequestResult(**r) for r in d["requests"]]
    return RunResult(d["target"], d["concurrency"], d["max_tokens"], d["wall_s"], requests, CpuUse(**d["cpu"]),
                     d.get("engine_steps", 0), d.get("engine_step_s", 0.0))  # fmt: skip


@dataclass(frozen=True)
class Summary:
    """One row of the report table."""

    target: str
    concurrency: int
    requests: int
    errors: int
    short: int  # finished without error but with fewer than max_tokens tokens
    retries: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    client_cores: float  # CPU seconds / wall seconds
    server_cores: float
    other_cores: float = math.nan
    # Timed repeats of this (target, concurrency): the row is the median one, its latencies medians over all.
    repeats: int = 1
    tps_min: float = math.nan
    tps_max: float = math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation (numpy's default); NaN if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize(run: RunResult) -> Summary:
    done = [r for r in run.requests if r.ok]
    tokens = sum(r.tokens for r in run.requests)  # partial streams still streamed tokens
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    # Pooled over all requests: a p95 over every gap, not a mean of per-request p95s.
    itls = [gap for r in done for gap in r.itl_s]
    wall = run.wall_s
    return Summary(
        target=run.target,
        concurrency=run.concurrency,
        requests=len(run.requests),
        errors=len(run.requests) - len(done),
        short=sum(1 for r in done if r.tokens < run.max_tokens),
        retries=sum(r.retries for r in run.requests),
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else math.nan,
        ttft_p50_ms=percentile(ttfts, 50) * 1e3,
        ttft_p95_ms=percentile(ttfts, 95) * 1e3,
        itl_p50_ms=percentile(itls, 50) * 1e3,
        itl_p95_ms=percentile(itls, 95) * 1e3,
        client_cores=run.cpu.client_s / wall if wall > 0 else math.nan,
        server_cores=sum(run.cpu.server_s.values()) / wall if wall > 0 else math.nan,
        other_cores=run.cpu.other_s / wall if wall > 0 else math.nan,
    )


def _tps(run: RunResult) -> float:
    return sum(r.tokens for r in run.requests) / run.wall_s if run.wall_s > 0 else 0.0


def median_run(runs: Sequence[RunResult]) -> RunResult:
    """The run with the median tokens/s (the lower one of an even count)."""
    if not runs:
        raise ValueError("no runs")
    return sorted(runs, key=_tps)[(len(runs) - 1) // 2]


def _median(values: Sequence[float]) -> float:
    """The median of the known values (NaN: a run with no successes); NaN if none is."""
    return percentile([v for v in values if not math.isnan(v)], 50)


def summarize_repeats(runs: Sequence[RunResult]) -> Summary:
    """The median run's row plus the spread: on a shared 2-core machine one run can
    lose half its speed to a neighbour; the median of a few ignores that, the
    min-max shows it. Latencies are the medians over the runs of each run's
    percentiles: a run of one burst has one burst's TTFT, and the run with the
    median tokens/s is no likelier than any other to have the median burst."""
    speeds = [_tps(r) for r in runs]
    rows = [summarize(r) for r in runs]
    return replace(
        summarize(median_run(runs)),
        repeats=len(runs),
        tps_min=min(speeds),
        tps_max=max(speeds),
        ttft_p50_ms=_median([s.ttft_p50_ms for s in rows]),
        ttft_p95_ms=_median([s.ttft_p95_ms for s in rows]),
        itl_p50_ms=_median([s.itl_p50_ms for s in rows]),
        itl_p95_ms=_median([s.itl_p95_ms for s in rows]),
    )
