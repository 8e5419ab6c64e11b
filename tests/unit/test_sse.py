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
