"""Render summaries: a text table for the terminal, a Markdown section for
BENCHMARKS.md, and a throughput-vs-concurrency chart.

Rendering is pure (strings in, strings out) except `write_section`, `write_chart`
and `machine_info`, which touch the file system or the host.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.stats import Summary

# The ratios the issue sets targets for: ours against each reference; and
# ours against raw without the eos-ban processors, the ceiling for an engine
# that adds the bias batch-wide (ours does, in its shared sampler).
RATIOS: tuple[tuple[str, str], ...] = (
    ("ours", "mlx_lm"),
    ("ours", "raw"),
    ("mlx_lm", "raw"),
    ("ours", "raw_nobias"),
)
COLUMNS = (
    "target", "conc", "tok/s", "tok/s min-max", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms",
    "errors", "short", "retries", "client cores", "server cores", "other cores",
)  # fmt: skip
SECTION_BEGIN = "<!-- bench:{name}:begin -->"
SECTION_END = "<!-- bench:{name}:end -->"
DEFAULT_HEADER = (
    "# Benchmarks\n\nWritten by `python -m bench.serving`; each section is replaced by a rerun of its command.\n"
)


def _num(value: float, digits: int = 1) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def summary_row(s: Summary) -> list[str]:
    return [
        s.target, str(s.concurrency), _num(s.tokens_per_s, 0),
        f"{_num(s.tps_min, 0)}-{_num(s.tps_max, 0)}" if s.repeats > 1 else "–",
        _num(s.ttft_p50_ms), _num(s.ttft_p95_ms), _num(s.itl_p50_ms, 2), _num(s.itl_p95_ms, 2),
        str(s.errors), str(s.short), str(s.retries), _num(s.client_cores, 2), _num(s.server_cores, 2), _num(s.other_cores, 2),
    ]  # fmt: skip


def ratio_rows(summaries: Sequence[Summary]) -> tuple[list[str], list[list[str]]]:
    """Throughput ratios per concurrency, for the pairs whose both targets were measured."""
    tps = {(s.target, s.concurrency): s.tokens_per_s for s in summaries}
    targets = {s.target for s in summaries}
    pairs = [(a, b) for a, b in RATIOS if a in targets and b in targets]
    header = ["conc", *(f"{a}/{b}" for a, b in pairs)]
    rows = []
    for conc in sorted({s.concurrency for s in summaries}):
        cells = [str(conc)]
        for a, b in pairs:
            num, den = tps.get((a, conc)), tps.get((b, conc))
            cells.append(f"{num / den:.2f}" if num and den and not math.isnan(num / den) else "–")
        rows.append(cells)
    return header, rows if pairs else []


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def failure_line(message: str) -> str:
    """One line for a failed target: the exception, plus the last error line of the
    server log it carries (the exception alone often says only 'exited 1')."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "failed"
    errors = [line for line in lines[1:] if "Error" in line or "error" in line]
    return f"{lines[0]} ... {errors[-1]}" if errors else lines[0]


def single_stream_line(summaries: Sequence[Summary]) -> str | None:
    """ours' one-stream inter-token latency against mlx-lm's stream_generate, when both ran."""
    at_one = {s.target: s for s in summaries if s.concurrency == 1}
    ours, ref = at_one.get("ours"), at_one.get("stream_generate")
    if ours is None or ref is None or not ref.itl_p50_ms:
        return None
    return (
        f"single-stream ITL p50: ours {ours.itl_p50_ms:.2f} ms, stream_generate {ref.itl_p50_ms:.2f} ms "
        f"(ours/stream_generate {ours.itl_p50_ms / ref.itl_p50_ms:.3f})"
    )


def terminal_report(summaries: Sequence[Summary], failures: dict[str, str]) -> str:
    parts = [text_table(COLUMNS, [summary_row(s) for s in summaries])]
    header, rows = ratio_rows(summaries)
    if rows:
        parts.append("tokens/s ratios\n" + text_table(header, rows))
    single = single_stream_line(summaries)
    if single:
        parts.append(single)
    parts += [f"FAILED {t}: {failure_line(msg)}" for t, msg in failures.items()]
    return "\n\n".join(parts)


@dataclass(frozen=True)
class SectionInfo:
    name: str  # the section's marker name: a rerun with the same name replaces it
    title: str
    date: str
    command: str
    machine: dict[str, str]
    settings: dict[str, str]  # load and target settings, shown as a list
    chart: str | None = None  # path relative to the Markdown file
    notes: tuple[str, ...] = ()


def markdown_section(info: SectionInfo, summaries: Sequence[Summary], failures: dict[str, str]) -> str:
    out = [SECTION_BEGIN.format(name=info.name), f"## {info.title}", ""]
    out += [f"Measured {info.date} with:", "", "```", info.command, "```", ""]
    out += ["| machine | |", "|---|---|", *(f"| {k} | {v} |" for k, v in info.machine.items()), ""]
    out += [f"* {k}: {v}" for k, v in info.settings.items()] + [""]
    out += [markdown_table(COLUMNS, [summary_row(s) for s in summaries]), ""]
    header, rows = ratio_rows(summaries)
    if rows:
        out += ["Streamed tokens/s ratios:", "", markdown_table(header, rows), ""]
    single = single_stream_line(summaries)
    if single:
        out += [single[0].upper() + single[1:] + ".", ""]
    if info.chart:
        out += [f"![throughput vs concurrency]({info.chart})", ""]
    out += [f"* **{t} failed**: `{failure_line(msg)}`" for t, msg in failures.items()]
    out += [f"* {n}" for n in info.notes]
    if failures or info.notes:
        out.append("")
    out.append(SECTION_END.format(name=info.name))
    return "\n".join(out) + "\n"


def replace_section(document: str, name: str, section: str) -> str:
    """Swap the named section in place, or append it; everything else is kept."""
    pattern = re.compile(
        re.escape(SECTION_BEGIN.format(name=name)) + r".*?" + re.escape(SECTION_END.format(name=name)) + r"\n?",
        re.DOTALL,
    )
    if pattern.search(document):
        return pattern.sub(lambda _: section, document, count=1)
    if not document.strip():
        document = DEFAULT_HEADER
    return document.rstrip("\n") + "\n\n" + section


def write_section(path: Path, name: str, section: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(replace_section(old, name, section), encoding="utf-8")


def write_chart(path: Path, summaries: Sequence[Summary], title: str) -> bool:
    """tokens/s vs concurrency, one line per target (matplotlib: a bench-only dependency).

    False, and no file, where matplotlib is missing (the GPU host): the --json
    dump can be charted elsewhere with --replot."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    concs = sorted({s.concurrency for s in summaries})
    for target in dict.fromkeys(s.target for s in summaries):
        rows = sorted((s for s in summaries if s.target == target), key=lambda s: s.concurrency)
        y = [s.tokens_per_s for s in rows]
        # Bars span the repeats' min-max around the median: the spread is part of the result.
        low = [0.0 if math.isnan(s.tps_min) else t - s.tps_min for s, t in zip(rows, y)]
        high = [0.0 if math.isnan(s.tps_max) else s.tps_max - t for s, t in zip(rows, y)]
        ax.errorbar([s.concurrency for s in rows], y, yerr=[low, high], marker="o", capsize=3, label=target)
    ax.set_xscale("log", base=2)
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("streamed tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{title}\n(median of repeats; bars: min-max)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))} ({platform.system()} {platform.release()})"
    except OSError:
        pass
    return platform.platform()


# The packages whose versions a section names: the engine's, the load generator's, the HTTP server's.
REPORTED_PACKAGES = frozenset({
    "mlx", "mlx-cpu", "mlx-cuda", "mlx-cuda-12", "mlx-cuda-13", "mlx-metal", "mlx-lm",
    "httpx", "aiohttp", "gunicorn", "gevent",
})  # fmt: skip


def _versions() -> str:
    names = sorted(
        {d.metadata["Name"].lower() for d in importlib.metadata.distributions() if d.metadata["Name"]}
        & REPORTED_PACKAGES
    )
    return ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)


def _gpu() -> str | None:
    """'NVIDIA H100 80GB HBM3, 81559 MiB, driver 580.159.04' per GPU; None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        gpus.append(f"{parts[0]}, {parts[1]}, driver {parts[2]}" if len(parts) == 3 else line.strip())
    return "; ".join(gpus) or None


def machine_info() -> dict[str, str]:
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "CPU": _cpu_model(),
        "cores": f"{usable} usable ({os.cpu_count()} online)",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": _os_name(),
        "Python": sys.version.split()[0],
        "packages": _versions(),
    }
    gpu = _gpu()
    if gpu:
        info["GPU"] = gpu
    return info
