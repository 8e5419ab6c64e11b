"""One log format for every mlx-server process: plain text or JSON lines.

The supervisor, the engine and gunicorn (master and workers, through
``dict_config`` in its ``logconfig_dict``) all log through these formatters,
so a deployment reads one shape. Lines about an HTTP request carry its id
(``REQUEST_ID``, set by the frontend for the request's thread): the
``chatcmpl-…``/``cmpl-…`` id a client sees, else ``req-…``.

Standard library only, in ``ipc`` so the engine and the frontend share it
without importing ``deploy``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, Literal, get_args

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)

# The request the current thread works for; None outside requests.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlx_server_request_id", default=None)

# LogRecord attributes that are not user "extra" fields.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Stamps ``record.request_id`` from REQUEST_ID (unless the caller passed one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,123 web INFO frontend.app [chatcmpl-…]: message``."""

    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s {role} %(levelname)s%(origin)s: %(message)s")
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        origin = "" if record.name == self._role else f" {record.name}"  # the supervisor's logger is its role
        record.origin = f"{origin} [{request_id}]" if request_id else origin
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, role, pid, logger, message, request_id, extras."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso_time(record.created),
            "level": record.levelname.lower(),
            "role": self._role,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():  # logging's `extra=` fields
            if key not in _RECORD_FIELDS and not key.startswith("_") and key != "origin":
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def make_formatter(role: str, log_format: str) -> logging.Formatter:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    return JsonFormatter(role) if log_format == "json" else TextFormatter(role)


def configure(role: str, level: str, log_format: str, stream: Any = None) -> None:
    """Route the root logger to ``stream`` (stderr) in ``log_format``; replaces basicConfig."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(role, log_format))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def dict_config(role: str, log_format: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict (gunicorn's ``logconfig_dict``).

    gunicorn's own loggers propagate to the root handler, so its lines share
    the format. No levels here: gunicorn sets its loggers' level from
    ``--log-level``, and the config's hooks set the root's to match.
    """
    make_formatter(role, log_format)  # fail at config load, not at the first line
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "mlx_server": {"()": "ipc.logging_setup.make_formatter", "role": role, "log_format": log_format}
        },
        "filters": {"request_id": {"()": "ipc.logging_setup.RequestIdFilter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "mlx_server",
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"handlers": [], "propagate": True},
            # A logconfig turns gunicorn's access log on; keep it off as without one
            # (frontend.middleware logs each request at debug level, with its id).
            "gunicorn.access": {"handlers": [], "propagate": True, "level": "WARNING"},
        },
    }
