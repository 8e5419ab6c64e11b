"""``python -m deploy.procfile engine|web``: one process of the Procfile, set up as mlx-server would.

A Procfile runner (honcho, foreman) starts the engine and gunicorn side by side,
without the supervisor. For each, this module resolves the settings as
``mlx-server`` does (deploy.settings), from the environment (``MLX_SERVER_*``,
which the runner loads from ``.env``) and the config file (``MLX_SERVER_CONFIG``),
hands the process the same typed config (ipc.runtime), then becomes that process
(exec): the runner signals and watches the engine or gunicorn itself.

Differences from ``mlx-server``: no sharded engine (a group of ranks needs the
supervisor); the engine socket must be named
(``MLX_SERVER_IPC_ADDRESS``), since the two processes share no private
directory; gunicorn binds ``$PORT`` (the runner's convention) unless
``MLX_SERVER_PORT`` is set; the web workers boot without waiting for the engine
and answer 503 until it is ready, then reconnect by themselves if it restarts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

from deploy.settings import PROG, Settings, SettingsError, env_var, load_settings
from deploy.supervisor import child_environment, engine_command, port_problem, web_command
from ipc.logging_setup import configure as configure_logging

log = logging.getLogger("mlx-server")

EXIT_USAGE = 2
RUNNER_PORT = "PORT"  # honcho and foreman give each process type its own $PORT
ROLES = ("engine", "web")


def resolve(role: str, environ: Mapping[str, str]) -> Settings:
    env = dict(environ)
    if role == "web" and env.get(RUNNER_PORT) and not env.get(env_var("port")):
        env[env_var("port")] = env[RUNNER_PORT]
    settings = load_settings([], env)
    if not settings.ipc_address:
        raise SettingsError(
            f"set {env_var('ipc_address')} (e.g. ipc:///path/to/private/dir/engine.sock or "
            "tcp://127.0.0.1:5557): the engine and the web processes of a Procfile meet there"
        )
    if settings.distributed() is not None:
        # Its ranks start through mlx.launch and live and die as one group, which only the
        # supervisor watches; a runner would see one process and miss a lost rank.
        raise SettingsError(
            f"a sharded engine ({env_var('distributed_ranks')} or {env_var('distributed_hostfile')}) "
            f"runs under {PROG}, which starts its ranks and restarts them as one group; "
            "a Procfile runs one engine process"
        )
    return settings


def command(role: str, settings: Settings, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that ``role`` is exec'ed with: the config mlx-server would
    hand it, without a supervisor to watch or a drain flag (the runner stops the processes)."""
    address = settings.ipc_address
    assert address is not None
    env = child_environment(settings.runtime_config(address), environ)
    return (engine_command() if role == "engine" else web_command(settings)), env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.procfile", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=ROLES)
    role = parser.parse_args(argv).role
    try:
        settings = resolve(role, os.environ)
    except SettingsError as exc:
        print(f"{PROG} {role}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problem = port_problem(settings.host, settings.port) if role == "web" else None
    if problem is not None:
        print(f"{PROG} {role}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging("mlx-server", settings.log_level, settings.log_format)
    argv_, env = command(role, settings, os.environ)
    log.info("starting %s: %s", role, " ".join(argv_))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv_[0], argv_, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
