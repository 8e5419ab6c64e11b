"""SSE framing: named events, and JSON whose line separators are escaped."""

from __future__ import annotations

import json

from frontend import sse
from frontend.errors import ErrorDetail


def _detail(message: str) -> ErrorDetail:
    return ErrorDetail(message=message, type="t", param=None, code=None)


def test_an_event_is_one_data_line_optionally_named() -> None:
    assert sse.event(_detail("hi")) == b'data: {"message":"hi","type":"t","param":null,"code":null}\n\n'
    assert sse.event(_detail("hi"), name="error").startswith(b"event: error\ndata: {")


def test_unicode_line_separators_are_escaped_and_the_json_is_unchanged() -> None:
    message = "one\u2028two\u2029three\u0085four é"
    frame = sse.event(_detail(message))
    text = frame.decode()
    # A client that splits lines like str.splitlines still sees one data line.
    assert text.splitlines() == text.split("\n")[:-1]
    assert json.loads(text.removeprefix("data: ").strip())["message"] == message


class _Stream:
    def __init__(self, request_id: str, log: list[str]) -> None:
        self.request_id = request_id
        self._log = log

    def forwarded(self, timeout_s: float) -> bool:
        self._log.append(f"forwarded {self.request_id} within {timeout_s} s")
        return True

    def close(self) -> None:
        self._log.append(f"closed {self.request_id}")


def test_a_response_starts_once_every_request_of_it_left_for_the_engine() -> None:
    log: list[str] = []

    def events():
        log.append("first event")
        yield b"data: {}\n\n"

    body = sse.SSEBody(events(), [_Stream("a", log), _Stream("b", log)])  # type: ignore[list-item]
    chunks = iter(body)
    assert next(chunks) == b""  # gunicorn writes the headers here
    wait = sse.FORWARD_WAIT_S
    assert log == [f"forwarded a within {wait} s", f"forwarded b within {wait} s"]
    assert list(chunks) == [b"data: {}\n\n"]
    body.close()
    assert log[2:] == ["first event", "closed a", "closed b"]
