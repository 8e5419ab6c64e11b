"""The one polling helper of the tests: every wait is bounded and says what it waited for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

WAIT_S = 30.0
INTERVAL_S = 0.1


def wait_until(
    predicate: Callable[[], T],
    what: str,
    timeout_s: float = WAIT_S,
    interval_s: float = INTERVAL_S,
    context: Callable[[], str] | None = None,
) -> T:
    """Call `predicate` every `interval_s` until it returns something truthy, and return that.

    After `timeout_s` an AssertionError names `what` (and `context()`, e.g. a server's log).
    An exception from `predicate` (a process that died) ends the wait at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f":\n{context()}" if context else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{detail}")
        time.sleep(interval_s)
