"""The one server-sent-events reader of the tests: event data out of a stream's lines.

Works on `httpx.Response.iter_lines()` and on a WSGI body's `text.splitlines()` alike.
Lines of one event are joined as the SSE spec says; comment lines (`: ...`) are skipped;
any field other than `data:` fails, since our streams carry nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

DONE = "[DONE]"


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The data of each event, in order, `[DONE]` included (lazily: a caller may stop mid-stream)."""
    parts: list[str] = []
    for line in lines:
        if not line:
            if parts:
                yield "\n".join(parts)
                parts = []
        elif line.startswith(":"):
            continue
        else:
            field, sep, value = line.partition(":")
            assert field == "data" and sep, f"not a data line: {line!r}"
            parts.append(value.removeprefix(" "))
    if parts:
        yield "\n".join(parts)


def sse_events(lines: Iterable[str]) -> list[Any]:
    """Each event's JSON, decoded; the `[DONE]` sentinel stays the string "[DONE]"."""
    return [data if data == DONE else json.loads(data) for data in sse_data(lines)]


def sse_chunks(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a stream, without `[DONE]`."""
    return (json.loads(data) for data in sse_data(lines) if data != DONE)
