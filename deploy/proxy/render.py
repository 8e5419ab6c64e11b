"""Write deploy/proxy/nginx.conf for any set of instances and any listen address.

    python deploy/proxy/render.py [--listen 8080] NAME=PORT [NAME=PORT ...] > nginx.conf

nginx.conf is both the example and the template: this rewrites its `listen` line and the
lines between `# instances:begin` and `# instances:end` (one upstream block and one map line
per instance). Rendering the example instances gives nginx.conf back unchanged (a test checks),
so the two cannot drift apart. Standard library only: run it with any python3.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

TEMPLATE = Path(__file__).resolve().with_name("nginx.conf")
EXAMPLE_INSTANCES: dict[str, int] = {"model-a": 8001, "model-b": 8002}
EXAMPLE_LISTEN = "8080"
# Names appear in URLs (/m/<name>/...), upstream names and the map: keep them plain.
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
INSTANCE_HOST = "127.0.0.1"  # instances bind loopback; only the proxy faces the network
UPSTREAM_KEEPALIVE = 16  # idle connections kept per instance, per nginx worker

BEGIN, END = "    # instances:begin\n", "    # instances:end\n"
LISTEN_RE = re.compile(r"^(\s*listen )[^;\n]+;$", re.MULTILINE)

UPSTREAM = """\
    upstream mlx-{name} {{
        server {host}:{port} max_fails=0;
        keepalive {keepalive};
        keepalive_timeout 4s;
    }}
"""
MAP_HEAD = '    map $mlx_name $mlx_upstream {\n        default "";\n'
MAP_LINE = "        {name} mlx-{name};\n"
MAP_TAIL = "    }\n"


def instances_block(instances: Mapping[str, int]) -> str:
    upstreams = "".join(
        UPSTREAM.format(name=name, host=INSTANCE_HOST, port=port, keepalive=UPSTREAM_KEEPALIVE)
        for name, port in instances.items()
    )
    lines = "".join(MAP_LINE.format(name=name) for name in instances)
    return upstreams + MAP_HEAD + lines + MAP_TAIL


def _check(instances: Mapping[str, int]) -> None:
    if not instances:
        raise ValueError("no instances: give at least one NAME=PORT")
    for name, port in instances.items():
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"instance name {name!r}: use letters, digits, '.', '-' and '_'")
        if not 1 <= port <= 65535:
            raise ValueError(f"instance {name}: port {port} is out of range 1-65535")


def render(
    instances: Mapping[str, int] = EXAMPLE_INSTANCES,
    listen: str | int = EXAMPLE_LISTEN,
    template: str | None = None,
) -> str:
    """nginx.conf routing /m/<name>/ to 127.0.0.1:<port> for each instance, listening on
    `listen` (a port, or ADDRESS:PORT such as 127.0.0.1:8080)."""
    _check(instances)
    text = TEMPLATE.read_text() if template is None else template
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise ValueError("template lacks the `# instances:begin` / `# instances:end` markers")
    tail, count = LISTEN_RE.subn(lambda m: f"{m.group(1)}{listen};", tail)
    if count != 1:
        raise ValueError(f"template must hold exactly one `listen` line, found {count}")
    return head + BEGIN + instances_block(instances) + END + tail


def _parse_instance(text: str) -> tuple[str, int]:
    name, sep, port = text.partition("=")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PORT, e.g. qwen=8001")
    return name, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="render.py", description="Write the nginx config for several mlx-server instances."
    )
    parser.add_argument("--listen", default=EXAMPLE_LISTEN, help="PORT or ADDRESS:PORT [default: %(default)s]")
    parser.add_argument("instances", nargs="+", type=_parse_instance, metavar="NAME=PORT")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(render(dict(args.instances), args.listen))
    except ValueError as exc:
        print(f"render.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
