"""QUICKSTART.md's commands and examples/client.py, run as written against a real server.

Each runnable block in QUICKSTART.md follows a marker line

    <!-- quickstart:test name=NAME expect="TEXT" [expect="TEXT" ...] -->

and is itself followed by a sample-output block. The test runs the block with bash (port and
interpreter substituted), and checks that it succeeds and that every `expect` text is in what
it printed and in the sample the document shows: the doc says what the command prints.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.server import REPO_ROOT, ServerProcess, child_env
from tests.system_tools import require_system_tool

QUICKSTART = REPO_ROOT / "QUICKSTART.md"
README = REPO_ROOT / "README.md"
CLIENT = REPO_ROOT / "examples" / "client.py"
DOC_ADDRESS = "127.0.0.1:8000"  # what the doc's commands use
COMMAND_TIMEOUT_S = 120.0
# Every block the doc must keep: a doc that loses one fails here instead of going untested.
NAMES = {"models", "chat", "stream", "completion", "client", "messages"}

MARKER_RE = re.compile(r"^<!-- quickstart:test (?P<attrs>.*?) -->\n```bash\n(?P<code>.*?)```\n", re.S | re.M)
NAME_RE = re.compile(r"\bname=(\S+)")
EXPECT_RE = re.compile(r'\bexpect="((?:[^"\\]|\\.)*)"')
VENV_TOOL_RE = re.compile(r"(?<![\w/.-])\.venv/bin/(pip|python)\b")
FENCE_RE = re.compile(r"```[a-z]*\n(.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    name: str
    code: str
    expects: tuple[str, ...]
    sample: str  # the output the doc shows right after the command


def quickstart_blocks() -> dict[str, Block]:
    text = QUICKSTART.read_text(encoding="utf-8")
    blocks = {}
    for match in MARKER_RE.finditer(text):
        attrs = match["attrs"]
        name = NAME_RE.search(attrs)
        assert name, f"quickstart:test marker without name=: {attrs}"
        sample = FENCE_RE.search(text, match.end())
        assert sample, f"block {name[1]}: no sample output after it"
        expects = tuple(e.replace('\\"', '"') for e in EXPECT_RE.findall(attrs))
        assert expects, f"block {name[1]}: no expect= in its marker"
        blocks[name[1]] = Block(name[1], match["code"], expects, sample[1])
    return blocks


@pytest.fixture(scope="session")
def curl() -> str:
    """The QUICKSTART commands' curl; session-scoped so a skip comes before any server starts."""
    return require_system_tool("curl", "apt-get install curl or brew install curl")


def localize(code: str, server: ServerProcess) -> str:
    """The doc's command, aimed at the test server and run with this test's interpreter."""
    python = shlex.quote(sys.executable)
    tools = {"pip": f"{python} -m pip", "python": python}
    code = code.replace(DOC_ADDRESS, f"127.0.0.1:{server.port}")
    return VENV_TOOL_RE.sub(lambda m: tools[m[1]], code)


def run_bash(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=REPO_ROOT,
        env=child_env({"PIP_DISABLE_PIP_VERSION_CHECK": "1"}),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def test_quickstart_has_every_block() -> None:
    blocks = quickstart_blocks()
    assert set(blocks) == NAMES
    for block in blocks.values():
        for expect in block.expects:
            assert expect in block.sample, f"{block.name}: the doc's sample lacks {expect!r}"
        assert DOC_ADDRESS in block.code, f"{block.name}: does not use {DOC_ADDRESS}"


def test_quickstart_install_is_the_readme_command() -> None:
    # QUICKSTART and README give the same set-up command (CI runs the README's).
    def after(marker: str, text: str) -> str:
        match = re.search(re.escape(marker) + r"\n```bash\n(.*?)\n```", text, re.S)
        assert match, f"no command after {marker}"
        return match[1]

    quickstart = after("<!-- quickstart:install -->", QUICKSTART.read_text(encoding="utf-8"))
    assert quickstart == after("<!-- ci:server-command -->", README.read_text(encoding="utf-8"))


def test_quickstart_flags_exist() -> None:
    # Every --flag the doc shows belongs to the command it is shown with.
    from deploy.settings import build_parser

    owners = {
        "mlx-server --help": {o for a in build_parser()._actions for o in a.option_strings},
        "run_server.sh": set(re.findall(r"--[a-z-]+", (REPO_ROOT / "run_server.sh").read_text())),
        "examples/client.py": set(re.findall(r'"(--[a-z][a-z-]+)"', CLIENT.read_text())),
    }
    known = set().union(*owners.values())
    text = QUICKSTART.read_text(encoding="utf-8")
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text))
    assert {"--port", "--demo", "--base-url"} <= mentioned
    assert mentioned <= known, f"flags no command has: {sorted(mentioned - known)}"


@pytest.mark.parametrize("name", sorted(NAMES))
def test_quickstart_command_runs(name: str, curl: str, tiny_server: ServerProcess) -> None:
    block = quickstart_blocks()[name]
    result = run_bash(localize(block.code, tiny_server))
    report = f"{block.code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    for expect in block.expects:
        assert expect in result.stdout, f"{expect!r} not in the output of {report}"
    if name == "stream":
        events = [line for line in result.stdout.splitlines() if line]
        assert all(line.startswith("data: ") for line in events), result.stdout
        assert len(events) >= 4 and events[-1] == "data: [DONE]", result.stdout


def test_example_client(tiny_server: ServerProcess, tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(CLIENT), "--base-url", f"{tiny_server.base_url}/v1"],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stdout.splitlines()
    assert lines[0] == f"model: {tiny_model_dir.name}", result.stdout
    for prefix in ("chat: ", "usage: ", "stream: ", "completion: "):
        assert any(line.startswith(prefix) for line in lines), f"no {prefix!r}:\n{result.stdout}"
    assert re.search(r"^stream: done \(\d+ chunks\)$", result.stdout, re.M), result.stdout


def test_example_client_without_server() -> None:
    # One clear line, not a traceback, when nothing listens.
    from tests.integration.server import free_port

    result = subprocess.run(
        [sys.executable, str(CLIENT), "--base-url", f"http://127.0.0.1:{free_port()}/v1"],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "is mlx-server running?" in result.stderr
