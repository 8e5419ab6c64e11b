"""Scanning streamed text for markers that may arrive split across pieces."""

from __future__ import annotations

from collections.abc import Iterable


def partial_suffix(buffer: str, markers: Iterable[str]) -> int:
    """Length of the longest end of ``buffer`` that begins one of ``markers``
    (text to hold back until the next piece says whether a marker follows)."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(buffer)), longest, -1):
            if buffer.endswith(marker[:size]):
                longest = size
                break
    return longest
