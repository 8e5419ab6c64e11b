"""Write a launchd plist that keeps one mlx-server instance running on a Mac.

    python -m deploy.launchd MODEL_PATH [--label com.mlx-server.NAME] [--port 8001]
        [--adapter-path PATH] [--log-dir ~/Library/Logs/mlx-server]
        [--mlx-server /abs/path/to/mlx-server] [--env KEY=VALUE ...] [--output FILE]
        [-- MORE MLX-SERVER FLAGS]

The settings are checked here, with the same resolver mlx-server uses, so a bad model path or
flag is a one-line error now (exit 2) instead of a job that launchd restarts forever.
deploy/launchd/README.md has the install, restart and removal steps.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, get_args

from deploy.settings import PROG, Settings, SettingsError, flag, load_settings

EXIT_USAGE = 2  # as mlx-server's: misconfigured, not crashed
ERROR_PREFIX = "deploy.launchd: error: "
LABEL_PREFIX = "com.mlx-server."
DEFAULT_PORT = 8001  # 8000 is mlx-server's own default: keep it free for a hand-started instance
DEFAULT_LOG_DIR = "~/Library/Logs/mlx-server"
# launchd sends SIGTERM, waits ExitTimeOut seconds, then SIGKILLs. mlx-server drains gunicorn
# (in-flight requests finish, up to supervisor.WEB_STOP_TIMEOUT_S + 5) and then stops the engine
# (up to ENGINE_STOP_TIMEOUT_S); launchd's default of 20 s would cut long streams off mid-answer.
EXIT_TIMEOUT_S = 60
# launchd's own PATH is /usr/bin:/bin:/usr/sbin:/sbin; Homebrew's prefixes come first so tools
# the model code may shell out to resolve as they do in a terminal.
BASE_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# deploy/launchd/com.mlx-server.example.plist is this example, rendered by `--example`.
EXAMPLE_DIR = Path(__file__).resolve().parent / "launchd"
EXAMPLE = {
    "label": "com.mlx-server.example",
    "program": "/Users/you/mlx-server/.venv/bin/mlx-server",
    "model_path": "/Users/you/models/Qwen2.5-7B-Instruct-4bit",
    "port": DEFAULT_PORT,
    "adapter_path": None,
    "log_dir": "/Users/you/Library/Logs/mlx-server",
    "working_directory": "/Users/you",
    "environment": {"MLX_SERVER_LOG_LEVEL": "info"},
    "extra_args": [],
}


class UsageError(Exception):
    """A bad argument, in one line."""


def build_plist(
    *,
    label: str,
    program: str,
    model_path: str,
    port: int,
    adapter_path: str | None,
    log_dir: str,
    working_directory: str,
    environment: Mapping[str, str],
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """The launchd job as a dict for plistlib; every path must already be absolute."""
    args = [program, model_path, "--port", str(port)]
    if adapter_path:
        args += ["--adapter-path", adapter_path]
    path = os.pathsep.join(dict.fromkeys([str(Path(program).parent), *BASE_PATH]))
    # Python buffers a non-terminal stdout; unbuffered, log lines reach the files as they happen.
    env = {"PATH": path, "PYTHONUNBUFFERED": "1", **environment}
    return {
        "Label": label,
        "ProgramArguments": [*args, *extra_args],
        "RunAtLoad": True,
        # Restart only after a failure: mlx-server exits non-zero when the engine or gunicorn
        # dies (or it is killed), and 0 when it was asked to stop (SIGTERM), so a deliberate
        # `launchctl kill TERM` stays down while a crash comes back (after ThrottleInterval).
        "KeepAlive": {"SuccessfulExit": False},
        # Interactive: no launchd resource limits. On a Mac mini serving requests the server is
        # the user-facing work; Background or Adaptive would let macOS throttle its CPU, I/O and
        # timers (slower tokens, late heartbeats). Use Standard on a shared desktop.
        "ProcessType": "Interactive",
        "ExitTimeOut": EXIT_TIMEOUT_S,
        "WorkingDirectory": working_directory,
        "StandardOutPath": str(Path(log_dir) / f"{label}.log"),
        "StandardErrorPath": str(Path(log_dir) / f"{label}.err.log"),
        "EnvironmentVariables": env,
    }


def render(plist: Mapping[str, Any]) -> bytes:
    return plistlib.dumps(dict(plist), fmt=plistlib.FMT_XML, sort_keys=False)


def example_plist() -> dict[str, Any]:
    return build_plist(**EXAMPLE)  # type: ignore[arg-type]


def find_mlx_server(python: str | None = None) -> str:
    """The console script beside this interpreter (its venv), else `mlx-server` on PATH."""
    beside = Path(python or sys.executable).parent / PROG  # no resolve(): keep the venv's bin
    if beside.is_file() and os.access(beside, os.X_OK):
        return os.path.abspath(beside)
    found = shutil.which(PROG)
    if found:
        return os.path.abspath(found)
    raise UsageError(
        f"cannot find the {PROG} executable next to {python or sys.executable} or on PATH: "
        "install this package (pip install -e .) or pass --mlx-server /abs/path/to/mlx-server"
    )


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_KEY_RE.fullmatch(key):
            raise UsageError(f"--env {pair!r}: expected KEY=VALUE with KEY a variable name")
        env[key] = value
    return env


def _default_label(model_path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model_path.name).strip("-.") or "model"
    return LABEL_PREFIX + name


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `python -m deploy.launchd --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m deploy.launchd",
        allow_abbrev=False,
        description="Write a launchd plist (a LaunchAgent) that runs one mlx-server instance.",
        epilog="Flags after `--` go to mlx-server as they are (e.g. -- --workers 4). "
        "Install steps: deploy/launchd/README.md.",
    )
    parser.add_argument("model_path", nargs="?", metavar="MODEL_PATH", help="model directory")
    parser.add_argument("--label", help=f"launchd label [default: {LABEL_PREFIX}<model dir name>]")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="[default: %(default)s]")
    parser.add_argument("--adapter-path", metavar="PATH", help="LoRA adapter directory")
    parser.add_argument("--log-dir", default=DEFAULT_LOG_DIR, metavar="DIR", help="[default: %(default)s]")
    parser.add_argument(
        "--mlx-server",
        metavar="PATH",
        help=f"absolute path of the {PROG} executable [default: the one beside this Python]",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable), e.g. MLX_SERVER_WORKERS=4",
    )
    parser.add_argument("--output", metavar="FILE", help="write here instead of stdout")
    parser.add_argument(
        "--example",
        action="store_true",
        help="print the documented example (placeholder paths, not checked) and exit",
    )
    return parser


def _split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


# mlx-server flags that take a path (--config, --distributed-hostfile, ...).
PATH_FLAGS = frozenset(
    flag(name)
    for name, field in Settings.model_fields.items()
    if Path in (field.annotation, *get_args(field.annotation))
)


def _absolute_paths(passthrough: Sequence[str]) -> list[str]:
    """The flags after `--` with their path values made absolute: launchd starts the job in
    HOME, where a path relative to this shell's directory means something else."""
    args = list(passthrough)
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name not in PATH_FLAGS:
            continue
        if eq:
            args[i] = f"{name}={os.path.abspath(Path(value).expanduser())}"
        elif i + 1 < len(args):
            args[i + 1] = os.path.abspath(Path(args[i + 1]).expanduser())
    return args


def _check_program(program: str) -> str:
    path = Path(program).expanduser()
    if not path.is_absolute():
        raise UsageError(f"--mlx-server {program}: must be an absolute path (launchd has no PATH)")
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise UsageError(f"--mlx-server {program}: not an executable file")
    return str(path)


def plist_from_args(argv: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """Parse and check the command line: (the job, --output). UsageError (one line) if bad."""
    own, passthrough = _split_passthrough(argv)
    passthrough = _absolute_paths(passthrough)
    args = build_parser().parse_args(own)
    if args.example:
        return example_plist(), args.output
    if not args.model_path:
        raise UsageError("no model path: python -m deploy.launchd /path/to/model [options]")
    environment = _parse_env(args.env)
    server_argv = [args.model_path, "--port", str(args.port)]
    if args.adapter_path:
        server_argv += ["--adapter-path", args.adapter_path]
    try:
        # The job's environment, not ours: launchd gives mlx-server only what the plist holds.
        settings = load_settings([*server_argv, *passthrough], environment)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    except SystemExit:  # --help/--version after `--`: argparse printed; nothing to write
        raise UsageError("mlx-server --help/--version do not belong in a plist") from None
    label = args.label or _default_label(settings.model_path)
    if not LABEL_RE.fullmatch(label):
        raise UsageError(f"--label {label!r}: use letters, digits, '.', '-' and '_' only")
    program = _check_program(args.mlx_server) if args.mlx_server else find_mlx_server()
    plist = build_plist(
        label=label,
        program=program,
        model_path=str(settings.model_path),  # made absolute by the settings validator
        port=settings.port,
        adapter_path=str(settings.adapter_path) if settings.adapter_path else None,
        # launchd expands neither ~ nor relative paths.
        log_dir=os.path.abspath(Path(args.log_dir).expanduser()),
        # Home always exists for a LaunchAgent; every path above is absolute, so only a relative
        # path inside a config file would depend on it.
        working_directory=str(Path.home()),
        environment=environment,
        extra_args=passthrough,
    )
    return plist, args.output


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        plist, output = plist_from_args(argv)
    except UsageError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # our own --help
        return exc.code if isinstance(exc.code, int) else 0
    data = render(plist)
    if output:
        try:
            Path(output).expanduser().write_bytes(data)
        except OSError as exc:
            print(f"{ERROR_PREFIX}cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"wrote {output} (label {plist['Label']})", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
