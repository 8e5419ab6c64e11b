"""``python -m deploy.group_launch MLX_LAUNCH [ARGS...]``: mlx.launch, tied to the mlx-server that started it.

mlx.launch outlives its parent: were mlx-server SIGKILLed, the ranks (mlx.launch's children,
whose own parent does not change) would serve on with nobody left to stop them. This runs
mlx.launch's own script in this process with one more thread, which SIGKILLs the whole
session (every local rank, every remote rank's ssh client, this process) once the parent is
gone: what the single engine process and gunicorn do when the supervisor dies.

It also stops mlx.launch from spinning. Its thread per rank waits with
``select(outputs, [rank's stdin], [], 1.0)`` to relay our stdin, and a pipe is
always writable, so that select returns at once, forever: measured, an idle
launcher took a whole core beside its ranks. Nothing is ever written to the
ranks' stdin here, so its select is given no write set.
"""

from __future__ import annotations

import os
import runpy
import select
import signal
import sys
import threading
import time
from typing import Any

# A getppid() syscall per check; the single engine looks as often (engine/proc.py).
PARENT_CHECK_INTERVAL_S = 1.0


def _kill_session_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    os.killpg(os.getpgrp(), signal.SIGKILL)  # started with start_new_session: the group's session


def _select_without_writes(rlist: list[Any], wlist: list[Any], xlist: list[Any], timeout: float | None = None) -> Any:
    readable, _, exceptional = select.select(rlist, [], xlist, timeout)
    return readable, [], exceptional


def _calm_launcher() -> None:
    from mlx._distributed_utils import launch  # mlx.launch's module: the script below imports it

    launch.select = _select_without_writes  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    script, *args = sys.argv[1:] if argv is None else argv
    _calm_launcher()
    threading.Thread(target=_kill_session_when_orphaned, args=(os.getppid(),), daemon=True).start()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
