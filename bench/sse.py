"""Minimal server-sent-events reading for the streams of each API (OpenAI chat and completions,
Anthropic Messages, OpenAI Responses).

The load generator shares two cores with the server it measures, so this does
the least work per chunk: split bytes on newlines, skip everything that is not
a `data:` line, decode one small JSON object per event. Every server here
writes each event as a single `data:` line, so multi-line events are not joined;
`event:` lines are skipped, since each API's JSON repeats the event's type.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

DONE = b"[DONE]"


class Event(NamedTuple):
    content: bool = False  # the chunk carried non-empty generated text
    usage_tokens: int | None = None  # usage.completion_tokens, if the chunk has usage
    done: bool = False  # the stream's last event (`[DONE]`, message_stop, response.completed)
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


def parse_line(line: bytes, api: str = "chat") -> Event | None:
    """The event a line of ``api``'s stream carries, or None for comments, blank lines and other fields."""
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
    return PAYLOADS[api](obj)


def _openai_chunk(obj: dict) -> Event:
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


def _messages_event(obj: dict) -> Event:
    """Anthropic: text in content_block_delta's text_delta, usage in message_delta, message_stop last."""
    kind = obj.get("type")
    if kind == "content_block_delta":
        delta = obj.get("delta") or {}
        return Event(content=delta.get("type") == "text_delta" and bool(delta.get("text")))
    if kind == "message_delta":
        return Event(usage_tokens=(obj.get("usage") or {}).get("output_tokens"))
    return Event(done=kind == "message_stop")


def _response_end(obj: dict) -> Event:
    usage = (obj.get("response") or {}).get("usage") or {}
    return Event(usage_tokens=usage.get("output_tokens"), done=True)


def _response_failed(obj: dict) -> Event:
    error = (obj.get("response") or {}).get("error") or {}
    return Event(error=str(error.get("message", "response.failed")))


_RESPONSE_EVENTS: dict[str, Callable[[dict], Event]] = {
    "response.output_text.delta": lambda obj: Event(content=bool(obj.get("delta"))),
    "response.completed": _response_end,
    "response.incomplete": _response_end,
    "response.failed": _response_failed,
    "error": lambda obj: Event(error=str(obj.get("message", "error event"))),
}


def _responses_event(obj: dict) -> Event:
    """OpenAI Responses: text in response.output_text.delta, usage in the final response event."""
    handler = _RESPONSE_EVENTS.get(obj.get("type", ""))
    return handler(obj) if handler is not None else Event()


# API name -> how one event's JSON reads.
PAYLOADS: dict[str, Callable[[dict[str, Any]], Event]] = {
    "chat": _openai_chunk,
    "completions": _openai_chunk,
    "messages": _messages_event,
    "responses": _responses_event,
}
