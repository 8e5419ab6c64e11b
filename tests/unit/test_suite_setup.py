"""The test suite itself: markers by collection hook, and system tools that skip on a fresh machine.

Each test runs pytest in a subprocess on this checkout, as a user or CI would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sse import sse_chunks, sse_data, sse_events
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTEST_TIMEOUT_S = 300
# The tests that need a program from a system package (tests/system_tools.py).
SYSTEM_TOOL_TESTS = [
    "tests/integration/test_proxy.py",
    "tests/integration/test_docs.py::test_quickstart_command_runs",
    "tests/integration/test_web_page.py",
]


def pytest_run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=PYTEST_TIMEOUT_S,
    )


def collected(result: subprocess.CompletedProcess[str]) -> set[str]:
    return {line for line in result.stdout.splitlines() if "::" in line}


@pytest.mark.parametrize(("ci", "exit_code"), [(None, 0), ("1", 1)])
def test_tests_needing_a_missing_system_tool_skip_unless_ci(tmp_path: Path, ci: str | None, exit_code: int) -> None:
    # A fresh machine: nginx, curl and chromium are on no directory of PATH.
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)
    if ci:
        env["CI"] = ci
    result = pytest_run(SYSTEM_TOOL_TESTS, env)
    out = result.stdout + result.stderr
    assert result.returncode == exit_code, out
    hints = (
        "nginx is not on PATH. Install it: apt-get install nginx",
        "curl is not on PATH. Install it: apt-get",
        "chromium is not on PATH. Install it: apt-get install chromium chromium-driver",
    )
    for hint in hints:
        assert hint in out, out
    if ci:
        assert "CI is set, so tests that need it must run" in out, out
        assert " skipped" not in out.splitlines()[-1], out
    else:
        assert " skipped" in out.splitlines()[-1] and "passed" not in out.splitlines()[-1], out


def test_every_integration_test_is_marked_integration() -> None:
    result = pytest_run(
        ["--collect-only", "-q", "-m", "not integration", "tests/integration", "tests/unit/test_ipc.py"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    items = collected(result)
    assert items and all(item.startswith("tests/unit/test_ipc.py::") for item in items), result.stdout
    assert "deselected" in result.stdout


def test_tests_using_smollm2_are_marked_slow() -> None:
    result = pytest_run(
        ["--collect-only", "-q", "-m", "slow", "tests/integration", "tests/unit/test_run_server_script.py"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    items = collected(result)
    assert "tests/unit/test_run_server_script.py::test_demo_passes_the_converted_model_dir" in items
    assert "tests/integration/test_fidelity.py::test_real_model_answers_and_stops_at_eos" in items
    assert "tests/integration/test_demo_model.py::test_known_ids" in items
    # Mocked conversion, tiny model: neither needs SmolLM2.
    assert not any("test_failed_conversion_leaves_no_model" in item for item in items)
    assert not any(item.startswith("tests/integration/test_server_http.py") for item in items)


def test_sse_reader_splits_events_as_sse_does_wherever_the_pieces_break() -> None:
    body = ': keepalive\n\ndata: {"a":\ndata: 1}\n\ndata:{"b": "x\u2028y\x85"}\r\n\r\ndata: [DONE]\n\n'
    expected = ['{"a":\n1}', '{"b": "x\u2028y\x85"}', "[DONE]"]
    assert list(sse_data(body)) == expected
    assert list(sse_data(body[i : i + 7] for i in range(0, len(body), 7))) == expected
    assert sse_events(body) == [{"a": 1}, {"b": "x\u2028y\x85"}, "[DONE]"]
    assert list(sse_chunks(body)) == [{"a": 1}, {"b": "x\u2028y\x85"}]
    assert list(sse_data("data: no blank line at the end")) == ["no blank line at the end"]
    with pytest.raises(AssertionError, match="not a data line"):
        list(sse_data("event: message\n\n"))


def test_wait_until_returns_the_first_truthy_value_or_fails_naming_what_it_waited_for() -> None:
    answers = iter([None, 0, {"ready": True}])
    assert wait_until(lambda: next(answers), "an answer", interval_s=0) == {"ready": True}
    with pytest.raises(AssertionError, match="waiting for the moon:\nlog line"):
        wait_until(lambda: False, "the moon", timeout_s=0, context=lambda: "log line")
