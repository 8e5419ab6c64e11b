"""``python -m deploy.group_launch MLX_LAUNCH [ARGS...]``: mlx.launch, tied to the mlx-server that started it.

mlx.launch outlives its parent: were mlx-server SIGKILLed, the ranks (mlx.launch's children,
whose own parent does not change) would serve on with nobody left to stop them. This runs
mlx.launch's own script in this process with one more thread, which SIGKILLs the whole
session (every local rank, every remote rank's ssh client, this process) once the parent is
gone: what the single engine process and gunicorn do when the supervisor dies.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

# A getppid() syscall per check; the single engine looks as often (engine/proc.py).
PARENT_CHECK_INTERVAL_S = 1.0


def _kill_session_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    os.killpg(os.getpgrp(), signal.SIGKILL)  # started with start_new_session: the group's session


def main(argv: list[str] | None = None) -> None:
    script, *args = sys.argv[1:] if argv is None else argv
    threading.Thread(target=_kill_session_when_orphaned, args=(os.getppid(),), daemon=True).start()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
