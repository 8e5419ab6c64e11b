"""The process boundaries of DESIGN.md, enforced.

The frontend (forked by gunicorn) must never load mlx, mlx_lm or the engine;
the engine must not know about HTTP; neither imports ``deploy``. Both talk
only through ``ipc``, which imports none of the three.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# deploy (settings, supervisor) is above both: what they share lives in ipc.
FRONTEND_FORBIDDEN = ("mlx", "mlx_lm", "engine", "deploy")
ENGINE_FORBIDDEN = ("falcon", "gunicorn", "frontend", "deploy")
IPC_FORBIDDEN = ("mlx", "mlx_lm", "engine", "frontend", "deploy", "falcon", "gunicorn")
# Modules that do work at import (wsgi builds the app and dials the engine):
# the static scan below still covers them.
IMPORT_SIDE_EFFECTS = frozenset({"frontend.wsgi"})


def _modules(package: str) -> list[str]:
    path = ROOT / package
    names = [package]
    for info in pkgutil.walk_packages([str(path)], prefix=f"{package}."):
        names.append(info.name)
    return sorted(names)


def test_frontend_modules_do_not_load_mlx_engine_or_deploy():
    """Import every frontend module in a fresh interpreter, then look at sys.modules."""
    modules = [m for m in _modules("frontend") if m not in IMPORT_SIDE_EFFECTS]
    assert "frontend.app" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRONTEND_FORBIDDEN!r})\n"
        "print(json.dumps(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"frontend imports pulled in {loaded}"


def _imported_roots(source: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    "package, forbidden",
    [("frontend", FRONTEND_FORBIDDEN), ("engine", ENGINE_FORBIDDEN), ("ipc", IPC_FORBIDDEN)],
)
def test_source_imports_respect_boundaries(package, forbidden):
    """Static scan, so lazy imports inside functions count too."""
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_roots(path.read_text(encoding="utf-8")) & set(forbidden)
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_scan_catches_lazy_imports():
    source = "def f():\n    import mlx.core as mx\n    from engine.core import X\n"
    assert _imported_roots(source) == {"mlx", "engine"}
