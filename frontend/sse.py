"""Server-sent events framing and the WSGI body that carries them.

Each event is one ``data:`` line holding compact JSON, then a blank line,
optionally after an ``event: NAME`` line (Anthropic and OpenAI Responses name
their events). Whether a stream ends with ``data: [DONE]`` is the API's choice:
OpenAI's chat and completions do, except after an error event.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from frontend.engine_client import RequestStream
from frontend.shapes import Shape

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/event-stream"
# Proxies (nginx) must pass events through as they come instead of buffering.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
# While a stream waits for its first token (a long prompt prefilling, a full
# queue), something is sent this often so that proxies and clients with an
# idle-read timeout (often 30-60 s) keep the connection: a comment line, which
# SSE clients skip, or the API's own no-op event (Anthropic's ping).
KEEPALIVE_INTERVAL_S = 15.0
KEEPALIVE_COMMENT = b": keep-alive\n\n"
# A response starts once its requests have left the worker for the engine,
# which takes one turn of the worker's I/O loop; this bounds that wait.
FORWARD_WAIT_S = 1.0


# Line separators that JSON leaves raw but clients that split lines like
# str.splitlines (httpx's iter_lines) break on: sent escaped, the same JSON.
_LINE_SEPARATORS = tuple((c.encode(), f"\\u{ord(c):04x}".encode()) for c in "\u2028\u2029\u0085")


def event(payload: Shape, name: str | None = None) -> bytes:
    """One event: ``[event: NAME\n]data: JSON\n\n``."""
    head = b"event: " + name.encode() + b"\n" if name else b""
    data = payload.dump()
    for raw, escaped in _LINE_SEPARATORS:
        if raw in data:
            data = data.replace(raw, escaped)
    return head + b"data: " + data + b"\n\n"


class SSEBody:
    """The WSGI iterable of a streamed response.

    WSGI servers call ``close()`` on the body when the response ends, also
    when the client went away mid-stream. Closing here (not only in the
    generator's ``finally``) matters: ``close()`` on a generator that never
    started runs no ``finally``, and the engine requests would be left behind.
    """

    def __init__(self, events: Iterator[bytes], streams: Iterable[RequestStream]) -> None:
        self._events = events
        self._streams = list(streams)

    def __iter__(self) -> Iterator[bytes]:
        # A burst's requests reach the engine before any of their responses
        # start: starting one costs the worker two socket writes (headers, first
        # event), which would delay every request of the burst parsed after it.
        # They are written while the engine prefills.
        for stream in self._streams:
            stream.forwarded(FORWARD_WAIT_S)
        # gunicorn sends the status line and headers on the first write, even
        # an empty one: the client sees its response start before any token
        # (an API whose first event waits for one, completions, would not).
        yield b""
        yield from self._events

    def close(self) -> None:
        try:
            close_generator = getattr(self._events, "close", None)
            if close_generator is not None:
                close_generator()
        finally:
            close_all(self._streams)


def close_all(streams: Iterable[RequestStream]) -> None:
    """Close every stream (aborting unfinished requests), whatever fails."""
    for stream in streams:
        try:
            stream.close()
        except Exception:  # one failed abort must not keep the others alive
            log.exception("closing request %s failed", getattr(stream, "request_id", "?"))
