"""Minimal server-sent-events reading for OpenAI chat streams.

The load generator shares two cores with the server it measures, so this does
the least work per chunk: split bytes on newlines, skip everything that is not
a `data:` line, decode one small JSON object per event. Every server here
writes each event as a single `data:` line, so multi-line events are not joined.
"""

from __future__ import annotations

import json
from typing import NamedTuple

DONE = b"[DONE]"


class Event(NamedTuple):
    content: bool = False  # the chunk carried non-empty generated text
    usage_tokens: int | None = None  # usage.completion_tokens, if the chunk has usage
    done: bool = False  # the `[DONE]` sentinel
    error: str | None = None  # an error object sent inside the stream


class LineSplitter:
    """Turns a byte stream into complete lines; keeps the unfinished tail for the next feed."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._tail:
            data = self._tail + data
        lines = data.split(b"\n")
        self._tail = lines.pop()
        return lines

    def flush(self) -> list[bytes]:
        tail, self._tail = self._tail, b""
        return [tail] if tail else []


def parse_line(line: bytes) -> Event | None:
    """The event a line carries, or None for comments, blank lines and other fields."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == DONE:
        return Event(done=True)
    if not payload:
        return None
    try:
        obj = json.loads(payload)
    except ValueError:
        return Event(error=f"bad JSON in stream: {payload[:80]!r}")
    if not isinstance(obj, dict):
        return Event(error=f"unexpected event: {payload[:80]!r}")
    if "error" in obj:
        err = obj["error"]
        return Event(error=str(err.get("message", err) if isinstance(err, dict) else err))
    usage = obj.get("usage")
    usage_tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return Event(content=_has_content(obj), usage_tokens=usage_tokens)


def _has_content(obj: dict) -> bool:
    for choice in obj.get("choices") or ():
        delta = choice.get("delta")
        # chat streams put text in delta.content; completions streams in text
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if text:
            return True
    return False
