"""How long a sharded server takes to notice a lost rank and to serve again.

    python -m bench.rank_death MODEL [--distributed-backend ring|nccl] [--distributed-mode tensor|pipeline]

Starts mlx-server over 2 ranks of this machine, streams one long chat completion
and SIGKILLs rank 1 once its first token is out, then times, from the kill:

* `stream_end_s`: the in-flight stream's end (its error event);
* `first_503_s`: the first new request answered 503 (with Retry-After), if any;
* `back_s`: the first chat completion answered 200 again (the group restarted and
  loaded the model).

`--repeats` kills in a row (each on the restarted group). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.servers import DISTRIBUTED_MODES, LOCAL_BACKENDS, ServerProcess, Sharding, ours_spec

STREAM_TOKENS = 100_000  # far more than the kill takes: the stream can only end by the kill
STREAM_TIMEOUT_S = 300.0
BACK_TIMEOUT_S = 600.0  # a restart reloads the model on every rank
POLL_S = 0.05


def _ranks(server: ServerProcess) -> dict[str, psutil.Process]:
    """MLX_RANK -> process, for the ranks under the server's mlx.launch."""
    found = {}
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            rank = p.environ().get("MLX_RANK")
        except psutil.Error:
            continue
        if rank is not None and "engine" in " ".join(p.cmdline()):
            found[rank] = p
    return found


def _chat(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": max_tokens,
        "stream": stream,
        "temperature": 0,
    }


def _stream(base: str, out: dict[str, float], started: threading.Event) -> None:
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=_chat(STREAM_TOKENS, True), timeout=STREAM_TIMEOUT_S
    ) as response:
        for line in response.iter_lines():
            if '"content":"' in line and not started.is_set():
                started.set()
            if '"error"' in line:
                break
    out["ended"] = time.monotonic()
    started.set()


def one_kill(server: ServerProcess) -> dict[str, float | None]:
    base = server.base_url
    out: dict[str, float] = {}
    started = threading.Event()
    thread = threading.Thread(target=_stream, args=(base, out, started), daemon=True)
    thread.start()
    if not started.wait(STREAM_TIMEOUT_S):
        raise RuntimeError("the stream never started")
    _ranks(server)["1"].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    thread.join(STREAM_TIMEOUT_S)
    first_503: float | None = None
    while time.monotonic() - killed < BACK_TIMEOUT_S:
        try:
            r = httpx.post(f"{base}/v1/chat/completions", json=_chat(4, False), timeout=60)
        except httpx.HTTPError:
            r = None
        now = time.monotonic()
        if r is not None and r.status_code == 503 and first_503 is None:
            first_503 = now
        if r is not None and r.status_code == 200:
            return {
                "stream_end_s": out["ended"] - killed if "ended" in out else None,
                "first_503_s": None if first_503 is None else first_503 - killed,
                "back_s": now - killed,
            }
        time.sleep(POLL_S)
    raise RuntimeError(f"the server did not answer again within {BACK_TIMEOUT_S:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rank_death", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model", type=Path)
    p.add_argument("--distributed-backend", choices=LOCAL_BACKENDS, default="ring")
    p.add_argument("--distributed-mode", choices=DISTRIBUTED_MODES, default="tensor")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--log-dir", type=Path, default=None)
    args = p.parse_args(argv)
    sharding = Sharding(2, args.distributed_mode, args.distributed_backend)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="rank-death-"))
    with ServerProcess(ours_spec(args.model, [], sharding), log_dir) as server:
        server.wait_ready(BACK_TIMEOUT_S)
        kills = [one_kill(server) for _ in range(args.repeats)]
    print(json.dumps({"sharding": sharding.describe(), "model": str(args.model), "kills": kills}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
