"""The one server-sent-events reader of the tests: each event's data, from a stream's text.

Takes a whole body (a WSGI test client's `text`) or its pieces as they arrive (httpx
`iter_text()`). Lines end at LF (a CR before it is dropped), as SSE says: httpx's
`iter_lines()` also splits at U+2028 and U+0085, which JSON leaves unescaped in generated
text. Lines of one event are joined; comment lines (`: ...`) are skipped; any field other
than `data:` fails, since our streams carry nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

DONE = "[DONE]"


def _lines(text: str | Iterable[str]) -> Iterator[str]:
    tail = ""
    for piece in [text] if isinstance(text, str) else text:
        *lines, tail = (tail + piece).split("\n")
        yield from (line.removesuffix("\r") for line in lines)
    if tail:
        yield tail.removesuffix("\r")


def sse_data(text: str | Iterable[str]) -> Iterator[str]:
    """The data of each event, in order, `[DONE]` included (lazily: a caller may stop mid-stream)."""
    parts: list[str] = []
    for line in _lines(text):
        if not line:
            if parts:
                yield "\n".join(parts)
                parts = []
        elif not line.startswith(":"):
            field, sep, value = line.partition(":")
            assert field == "data" and sep, f"not a data line: {line!r}"
            parts.append(value.removeprefix(" "))
    if parts:
        yield "\n".join(parts)


def sse_events(text: str | Iterable[str]) -> list[Any]:
    """Each event's JSON, decoded; the `[DONE]` sentinel stays the string "[DONE]"."""
    return [data if data == DONE else json.loads(data) for data in sse_data(text)]


def sse_chunks(text: str | Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a stream, without `[DONE]`."""
    return (json.loads(data) for data in sse_data(text) if data != DONE)
