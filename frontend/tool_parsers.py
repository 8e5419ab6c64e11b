"""mlx-lm's tool-call parsers (``mlx_lm/tool_parsers/*.py``), loaded without importing mlx.

Importing ``mlx_lm.tool_parsers`` runs ``mlx_lm/__init__.py``, which loads
mlx; the parser modules themselves are plain Python (json, ast, regex). They
are loaded from their files under a private package name whose ``__path__``
is that folder, so their relative imports (laguna -> glm47) work and
``mlx_lm/__init__.py`` never runs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PACKAGE = "_mlx_lm_tool_parsers"


@functools.cache
def _folder() -> Path | None:
    spec = importlib.util.find_spec("mlx_lm")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "tool_parsers"
    return folder if folder.is_dir() else None


def available() -> list[str]:
    """Names of the installed parser modules (mlx-lm's ``tool_parser_type`` values)."""
    folder = _folder()
    if folder is None:
        return []
    return sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")


@functools.cache
def load(name: str) -> types.ModuleType | None:
    """The parser module ``name`` (with ``parse_tool_call``, ``tool_call_start``, ``tool_call_end``)."""
    folder = _folder()
    if folder is None or name not in available():
        return None
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[_PACKAGE] = package
    try:
        return importlib.import_module(f"{_PACKAGE}.{name}")
    except ImportError:  # a parser needing a package the frontend lacks: its format is unsupported
        log.warning("mlx-lm tool parser %s cannot be loaded", name, exc_info=True)
        return None


def as_calls(parsed: Any) -> list[tuple[str, str]] | None:
    """mlx-lm's parse result (a call dict or a list of them) as (name, JSON arguments); None if not calls."""
    items = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        out.append((item["name"], arguments))
    return out or None
