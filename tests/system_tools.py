"""Programs from system packages that some tests run (nginx, curl).

Absent, those tests skip with the install hint, so the README's test command passes on a
fresh machine; with `CI` set they fail instead, so CI (which installs them) never skips them.
"""

from __future__ import annotations

import os
import shutil

import pytest

# What CI providers set: any value but these means "running in CI".
NOT_CI = ("", "0", "false", "no")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in NOT_CI


def require_system_tool(name: str, hint: str) -> str:
    """The path of `name` on PATH; otherwise skip (or fail under CI) saying how to install it."""
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not on PATH. Install it: {hint}"
    if in_ci():
        pytest.fail(f"{message}; CI is set, so tests that need it must run", pytrace=False)
    pytest.skip(message)
