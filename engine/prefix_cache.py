"""The engine's prefix cache: finished sequences' KV caches, found by the longest shared prefix.

Same contract as mlx-lm's LRUPromptCache (a token trie, least recently used
entries evicted past a byte cap, a cached sequence that extends past the
prompt trimmed back to it), with lookups that cost one walk down the prompt.
LRUPromptCache's search looks for the shortest entry below the shared prefix
by a depth-first walk of that whole subtree, copying the path at every node:
entries x suffix length squared: milliseconds per request at the engine's
256 entries, spent in the socket loop while a burst arrives (BENCHMARKS.md,
"Measurements behind the defaults"). It also copies a cache before the caller can say
the shared prefix is too short to be worth it. Here every trie node keeps
the length of the shortest entry below it, so the cheapest entry to copy is
found in one descent, and nothing is copied below ``min_reuse`` tokens.

An entry's size is its tokens x the whole model's KV bytes per token, not
its arrays' nbytes: every rank of a sharded engine (each holding its own
part of every cache) counts the same bytes and evicts the same entries.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

_NONE = 1 << 62  # `shortest` of a subtree without entries


@dataclass(eq=False, slots=True)
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    entry: _Entry | None = None
    # Token count of the shortest entry in this subtree (this node's own included):
    # the cheapest one to copy when any of them will do.
    shortest: int = _NONE


@dataclass(eq=False)
class _Entry:
    tokens: tuple[int, ...]
    cache: list[Any]  # one cache object per layer, as mlx-lm makes them
    nbytes: int
    trimmable: bool


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int, bytes_per_token: int, min_reuse: int = 1) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes_per_token = bytes_per_token
        # A shorter shared prefix is never reused (the caller's judgement: its
        # copy would cost about what prefilling it does).
        self.min_reuse = max(min_reuse, 1)
        self._root = _Node()
        self._lru: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # oldest first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    # ------------------------------------------------------------------ lookup

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        """A copy of the cache of the longest usable shared prefix, and the tokens left to prefill.

        At least one token is always left: the model must see the prompt's last
        token to produce the first logits. (None, tokens) when nothing of at
        least ``min_reuse`` tokens is shared.
        """
        node, depth = self._root, 0
        prefix: _Entry | None = None  # deepest entry whose tokens all start the prompt
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                break
            node, depth = child, depth + 1
            if child.entry is not None and depth < len(tokens):
                prefix = child.entry
        usable = min(depth, len(tokens) - 1)
        # An entry at or below the deepest shared node covers `usable` tokens once trimmed.
        deeper = self._shortest_entry_below(node) if depth else None
        if deeper is not None and deeper.trimmable and usable >= self.min_reuse:
            return self._copy(deeper, usable), tokens[usable:]
        if prefix is not None and len(prefix.tokens) >= self.min_reuse:
            return self._copy(prefix, len(prefix.tokens)), tokens[len(prefix.tokens) :]
        return None, tokens

    @staticmethod
    def _shortest_entry_below(node: _Node) -> _Entry | None:
        # One descent, always into the child whose subtree holds the shortest entry.
        target = node.shortest
        while node.entry is None or len(node.entry.tokens) != target:
            if not node.children:
                return None
            node = min(node.children.values(), key=lambda child: child.shortest)
        return node.entry

    def _copy(self, entry: _Entry, keep: int) -> list[Any]:
        self._lru.move_to_end(entry.tokens)
        cache = copy.deepcopy(entry.cache)
        if keep < len(entry.tokens):
            trim_prompt_cache(cache, len(entry.tokens) - keep)
        return cache

    # ------------------------------------------------------------------ insert / evict

    def insert(self, tokens: list[int], cache: list[Any]) -> None:
        key = tuple(tokens)
        if not key:
            return
        if key in self._lru:
            self._remove(key)
        entry = _Entry(key, cache, len(key) * self.bytes_per_token, can_trim_prompt_cache(cache))
        node = self._root
        node.shortest = min(node.shortest, len(key))
        shorter: list[tuple[int, ...]] = []
        for token in key:
            node = node.children.setdefault(token, _Node())
            node.shortest = min(node.shortest, len(key))
            if node.entry is not None:
                shorter.append(node.entry.tokens)
        node.entry = entry
        self._lru[key] = entry
        self.nbytes += entry.nbytes
        if entry.trimmable:
            # A trimmable cache answers for every prefix of itself: the shorter
            # entries on its path only take space.
            for prefix in shorter:
                self._remove(prefix)
        self.trim_to(self.max_bytes, self.max_entries)

    def trim_to(self, n_bytes: int, n_entries: int | None = None) -> None:
        """Evict least recently used entries until both limits hold."""
        limit = len(self._lru) if n_entries is None else max(n_entries, 0)
        while self._lru and (self.nbytes > max(n_bytes, 0) or len(self._lru) > limit):
            self._remove(next(iter(self._lru)))

    def _remove(self, key: tuple[int, ...]) -> None:
        entry = self._lru.pop(key)
        self.nbytes -= entry.nbytes
        path = [self._root]
        for token in key:
            path.append(path[-1].children[token])
        path[-1].entry = None
        # Bottom up: prune what no longer leads to an entry, recount the rest.
        for depth in range(len(key), -1, -1):
            node = path[depth]
            own = len(node.entry.tokens) if node.entry is not None else _NONE
            node.shortest = min([own, *(child.shortest for child in node.children.values())])
            if depth and node.shortest == _NONE:
                del path[depth - 1].children[key[depth - 1]]
