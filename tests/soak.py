"""Soak: many clients, random disconnects, malformed requests and one engine kill.

    python -m tests.soak --duration 180 --clients 64 --out RELIABILITY.md

Everything is bounded: each request has a timeout (a request that hits it is
counted as hung), clients stop at the deadline, the server is always stopped.
Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from tests.integration.server import ServerProcess
from tests.model_factory import build_tiny_model
from tests.sse import DONE, sse_data
from tests.waiting import wait_until

REQUEST_TIMEOUT_S = 60.0
# 5xx are expected from the kill until the engine is back, plus this margin.
KILL_WINDOW_MARGIN_S = 2.0
READY_POLL_S = 0.1
READY_STREAK = 5
MALFORMED = [
    ("POST", "/v1/chat/completions", b"{not json"),
    ("POST", "/v1/chat/completions", json.dumps({"messages": "nope"}).encode()),
    (
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -3}).encode(),
    ),
    ("POST", "/v1/completions", json.dumps({"prompt": [[-1]]}).encode()),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": "many"}).encode()),
    ("GET", "/v1/nothing-here", b""),
    ("DELETE", "/v1/chat/completions", b""),
    ("POST", "/v1/mlx/models/load", b"{}"),
]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)
    server_errors_at: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, outcome: str, at: float | None = None, failure: str | None = None, what: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if at is not None:
                self.server_errors_at.append((at, what))
            if failure:
                self.failures.append(failure)


def _stream(client: httpx.Client, rng: random.Random, no_eos: dict, tally: Tally) -> None:
    disconnect_after = rng.choice([None, None, None, rng.randint(1, 20)])
    payload = {
        "messages": [{"role": "user", "content": f"soak {rng.random()}"}],
        "max_tokens": rng.randint(8, 160),
        "stream": True,
        "logit_bias": no_eos,
    }
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        if r.status_code >= 500:
            tally.add("5xx", at=time.monotonic(), what=f"stream {r.status_code} {r.read()[:120]!r}")
            return
        chunks = 0
        last = ""
        for data in sse_data(r.iter_text()):
            chunks += 1
            last = data
            if disconnect_after is not None and chunks >= disconnect_after:
                tally.add("disconnected")
                return
        if last == DONE:
            tally.add("stream_ok")
        elif '"error"' in last:
            tally.add("5xx", at=time.monotonic(), what=f"error event {last[:160]}")
        else:
            tally.add("broken_stream", failure=f"stream ended without [DONE]: {last[:200]}")


def _complete(client: httpx.Client, rng: random.Random, no_eos: dict, tally: Tally) -> None:
    payload = {"prompt": "soak", "max_tokens": rng.randint(4, 64), "logit_bias": no_eos}
    r = client.post("/v1/completions", json=payload)
    if r.status_code == 200:
        tally.add("complete_ok")
    elif r.status_code >= 500:
        tally.add("5xx", at=time.monotonic(), what=f"complete {r.status_code} {r.text[:120]}")
    else:
        tally.add("unexpected_4xx", failure=f"{r.status_code} {r.text[:200]}")


def _malformed(client: httpx.Client, rng: random.Random, no_eos: dict, tally: Tally) -> None:
    method, path, body = rng.choice(MALFORMED)
    r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
    if 400 <= r.status_code < 500 and {"message", "type", "param", "code"} <= set(error):
        tally.add("malformed_rejected")
    elif r.status_code >= 500:
        tally.add("5xx", at=time.monotonic(), what=f"malformed {method} {path} {r.status_code} {r.text[:120]}")
    else:
        tally.add("malformed_wrong", failure=f"{method} {path}: {r.status_code} {r.text[:200]}")


ACTIONS: list[tuple[float, Callable]] = [(0.7, _stream), (0.15, _complete), (0.15, _malformed)]


def _client_loop(base: str, seed: int, deadline: float, no_eos: dict, tally: Tally) -> None:
    rng = random.Random(seed)
    weights = [w for w, _ in ACTIONS]
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as client:
        while time.monotonic() < deadline:
            action = rng.choices([a for _, a in ACTIONS], weights)[0]
            try:
                action(client, rng, no_eos, tally)
            except httpx.TimeoutException as exc:
                tally.add("hung", failure=f"{action.__name__}: timed out after {REQUEST_TIMEOUT_S} s: {exc}")
            except httpx.HTTPError as exc:  # a connection cut short
                tally.add("5xx", at=time.monotonic(), what=f"{action.__name__}: {type(exc).__name__} {exc}")


def _engine(server: ServerProcess) -> psutil.Process:
    return next(p for p in server.process_tree() if "engine" in p.cmdline() and "-m" in p.cmdline())


def _status(base: str) -> dict:
    return httpx.get(f"{base}/v1/mlx/status", timeout=10).json()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_recovered(base: str, limit_s: float = 120.0) -> float:
    """When the server is back after a kill: first not ready (the workers noticed),
    then ready on several checks in a row (every worker reconnected)."""
    deadline = time.monotonic() + limit_s
    wait_until(lambda: not _ready(base), "the workers to notice the kill", limit_s, READY_POLL_S / 10)
    streak = 0

    def steady() -> bool:
        nonlocal streak
        streak = streak + 1 if _ready(base) else 0
        return streak >= READY_STREAK

    wait_until(steady, "the engine to come back", max(deadline - time.monotonic(), 0.0), READY_POLL_S)
    return time.monotonic()


def run_soak(duration_s: float, clients: int, seed: int = 0, workdir: Path | None = None) -> dict:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="mlx-soak-"))
    model = build_tiny_model(workdir / "soak-model")
    eos = json.loads((model / "config.json").read_text())["eos_token_id"]
    no_eos = {str(t): -100 for t in eos}
    tally = Tally()
    with ServerProcess(model, workdir, workers=2) as server:
        base = server.base_url
        httpx.post(f"{base}/v1/completions", json={"prompt": "warm", "max_tokens": 8}, timeout=60)
        baseline = _status(base)["memory"]["active_bytes"]
        start = time.monotonic()
        deadline = start + duration_s
        threads = [
            threading.Thread(target=_client_loop, args=(base, seed * 1000 + i, deadline, no_eos, tally))
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        time.sleep(duration_s / 2)
        killed_at = time.monotonic()
        _engine(server).kill()
        back_at = _wait_recovered(base)
        for t in threads:
            t.join(REQUEST_TIMEOUT_S + duration_s)
        still_running = sum(t.is_alive() for t in threads)
        time.sleep(1)
        status = _status(base)
        window = (killed_at, back_at + KILL_WINDOW_MARGIN_S)
        outside = [
            f"{t - killed_at:+.2f}s after the kill: {what}"
            for t, what in tally.server_errors_at
            if not window[0] <= t <= window[1]
        ]
        return {
            "duration_s": duration_s,
            "clients": clients,
            "outcomes": dict(tally.outcomes),
            "requests": sum(tally.outcomes.values()),
            "engine_kills": 1,
            "engine_down_s": round(back_at - killed_at, 2),
            "server_errors_in_kill_window": len(tally.server_errors_at) - len(outside),
            "server_errors_outside_kill_window": len(outside),
            "outside_examples": outside[:10],
            "hung": tally.outcomes.get("hung", 0) + still_running,
            "failures": tally.failures[:20],
            "engine_idle_after": status["engine"]["running_requests"] + status["engine"]["queued_requests"] == 0,
            "memory_baseline_bytes": baseline,
            "memory_after_bytes": status["memory"]["active_bytes"],
            "prompt_cache_bytes_after": status["prompt_cache"]["bytes"],
        }


def render(result: dict, command: str) -> str:
    mem = result
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(result["outcomes"].items()))
    return f"""# Reliability

Soak run on {platform.node() or "this machine"} ({platform.processor() or platform.machine()},
{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.system()}),
{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, tiny generated model, 2 gunicorn workers.

Command: `{command}`

| figure | value |
|---|---|
| duration | {result["duration_s"]} s |
| concurrent clients | {result["clients"]} |
| requests | {result["requests"]} |
| client disconnects (random, mid-stream) | {result["outcomes"].get("disconnected", 0)} |
| malformed requests (all must be 4xx OpenAI errors) | {result["outcomes"].get("malformed_rejected", 0) + result["outcomes"].get("malformed_wrong", 0)} |
| faults injected | {result["engine_kills"]} engine SIGKILL (down {result["engine_down_s"]} s) |
| 5xx / error events inside the kill window | {result["server_errors_in_kill_window"]} |
| 5xx / error events outside the kill window | {result["server_errors_outside_kill_window"]} |
| hung requests | {result["hung"]} |
| other failures | {len(result["failures"])} |
| engine idle afterwards | {result["engine_idle_after"]} |
| engine active memory: baseline → after | {mem["memory_baseline_bytes"] / 1e6:.1f} MB → {mem["memory_after_bytes"] / 1e6:.1f} MB (prefix cache {mem["prompt_cache_bytes_after"] / 1e6:.1f} MB) |

Outcomes:

| outcome | count |
|---|---|
{rows}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    result = run_soak(args.duration, args.clients, args.seed)
    print(json.dumps(result, indent=2))
    if args.out:
        cmd = f"python -m tests.soak --duration {args.duration:g} --clients {args.clients} --out {args.out}"
        args.out.write_text(render(result, cmd))


if __name__ == "__main__":
    main()
