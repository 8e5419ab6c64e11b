"""KV memory reserved by the rows of the batch, counted in tokens of the whole model.

A row reserves its whole prompt plus ``max_tokens`` when it is inserted and
keeps that until it finishes or is aborted: nothing is ever aborted for
memory, so a row must be able to reach ``max_tokens``. A cached prefix saves
its prefill, not its memory: mlx-lm copies it into the row's cache.

The batch's footprint is that of mlx-lm's batch caches (``BatchKVCache``):
rows are left-padded to the longest one and the buffer grows in steps of
``KV_STEP_TOKENS``, so the rows take ``rows x longest`` tokens, not the sum
of their own. The prefix cache gets what the rows leave of the budget and
yields it to them.

Everything is tokens x bytes per token of the whole model, never the
arrays' own nbytes: every rank of a sharded engine, whatever part of the
model it holds, counts the same and takes the same decisions.
"""

from __future__ import annotations

from collections.abc import Iterable

# mlx-lm's KVCache.step / BatchKVCache.step: caches grow by this many tokens at a time.
KV_STEP_TOKENS = 256


def padded(tokens: int) -> int:
    """Tokens a cache buffer holds for ``tokens``: whole steps."""
    return -(-tokens // KV_STEP_TOKENS) * KV_STEP_TOKENS


class KvLedger:
    def __init__(self, bytes_per_token: int, budget_bytes: int) -> None:
        self.bytes_per_token = bytes_per_token
        self.budget_bytes = budget_bytes
        self._rows: dict[int, int] = {}  # uid -> tokens reserved

    def __len__(self) -> int:
        return len(self._rows)

    def reserve(self, uid: int, tokens: int) -> None:
        self._rows[uid] = tokens

    def release(self, uid: int) -> None:
        self._rows.pop(uid, None)

    def clear(self) -> None:
        self._rows.clear()

    def rows_bytes(self, extra: Iterable[int] = (), without: Iterable[int] = ()) -> int:
        """Bytes the rows reserve in the batch's layout, with rows of ``extra``
        tokens added and the uids in ``without`` gone."""
        gone = set(without)
        tokens = [t for uid, t in self._rows.items() if uid not in gone]
        tokens.extend(extra)
        if not tokens:
            return 0
        return len(tokens) * padded(max(tokens)) * self.bytes_per_token

    @property
    def reserved_bytes(self) -> int:
        return self.rows_bytes()

    def alone_bytes(self, tokens: int) -> int:
        """What one row of ``tokens`` reserves in an empty batch."""
        return padded(tokens) * self.bytes_per_token

    def cache_room(self) -> int:
        """Bytes the prefix cache may hold beside the rows."""
        return max(self.budget_bytes - self.reserved_bytes, 0)

    def admissible(self, candidates: Iterable[int], without: Iterable[int] = ()) -> int:
        """How many of ``candidates`` (tokens each, in arrival order) fit beside the
        rows, the uids in ``without`` gone. The first that does not fit stops the
        count: later arrivals never overtake it, so it cannot starve."""
        gone = set(without)
        tokens = [t for uid, t in self._rows.items() if uid not in gone]
        rows, longest = len(tokens), max(tokens, default=0)
        admitted = 0
        for t in candidates:
            rows, longest = rows + 1, max(longest, t)
            if rows * padded(longest) * self.bytes_per_token > self.budget_bytes:
                break
            admitted += 1
        return admitted
