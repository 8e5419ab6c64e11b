"""`mlx-server MODEL_PATH [options]`: resolve the settings, then hand them to the supervisor.

Every settings problem ends here as one stderr line and exit code 2, before any process starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from deploy.settings import PROG, Settings, SettingsError, load_settings, unknown_env_warnings

# argparse's code for a bad command line; a process manager sees "misconfigured", not "crashed".
EXIT_USAGE = 2

Runner = Callable[[Settings], int]


def main(argv: list[str] | None = None, run: Runner | None = None) -> int:
    """Console script `mlx-server`. `run` defaults to `deploy.supervisor.run`; tests inject one."""
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version: argparse has printed, nothing to run
        return exc.code if isinstance(exc.code, int) else 0
    for line in unknown_env_warnings():
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    if run is None:
        # Imported only now, so errors, --help and --version answer at once and start nothing.
        from deploy.supervisor import run
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
