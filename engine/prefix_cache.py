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

The trie is a radix tree: a node's edge holds every token up to the next
branch or entry, so it has about two nodes per entry whatever their length.
A node per token (mlx-lm's layout) makes the cache's prompts hundreds of
thousands of Python objects that every full garbage collection walks: tens of
milliseconds of engine stall each time, and a Python step per token in every
lookup, insert and eviction.

An entry's size is its tokens x the whole model's KV bytes per token, not
its arrays' nbytes: every rank of a sharded engine (each holding its own
part of every cache) counts the same bytes and evicts the same entries.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

_NONE = 1 << 62  # `shortest` of a subtree without entries


@dataclass(eq=False, slots=True)
class _Node:
    # The tokens from the parent to this node: a tuple of ints, which the garbage
    # collector stops tracking.
    edge: tuple[int, ...] = ()
    children: dict[int, _Node] = field(default_factory=dict)  # by the first token of their edge
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
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                break
            shared = _shared_length(child.edge, tokens, depth)
            # Every entry below `child` shares the prompt's first `depth + shared` tokens.
            node, depth = child, depth + shared
            if shared < len(child.edge):
                break
            if child.entry is not None and depth < len(tokens):
                prefix = child.entry
        usable = min(depth, len(tokens) - 1)
        # An entry at or below the deepest shared node covers `usable` tokens once trimmed.
        # Looked for only when that is worth a copy: most prompts share just a chat
        # template's head, and the answer is then no copy whatever lies below.
        deeper = self._shortest_entry_below(node) if usable >= self.min_reuse else None
        if deeper is not None and deeper.trimmable:
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
        node, depth = self._root, 0
        node.shortest = min(node.shortest, len(key))
        shorter: list[tuple[int, ...]] = []
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None:  # the rest of the key is a new leaf
                leaf = _Node(key[depth:], shortest=len(key))
                node.children[key[depth]] = leaf
                node = leaf
                break
            shared = _shared_length(child.edge, key, depth)
            if shared < len(child.edge):
                child = _split(node, child, shared)
            child.shortest = min(child.shortest, len(key))
            node, depth = child, depth + shared
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
        path, depth = [self._root], 0
        while depth < len(key):
            path.append(path[-1].children[key[depth]])
            depth += len(path[-1].edge)
        path[-1].entry = None
        # Bottom up: prune what no longer leads to an entry, merge a node left with
        # one child and no entry into that child, recount the rest.
        for i in range(len(path) - 1, -1, -1):
            node = path[i]
            own = len(node.entry.tokens) if node.entry is not None else _NONE
            node.shortest = min([own, *(child.shortest for child in node.children.values())])
            if not i:
                break
            siblings = path[i - 1].children
            if node.shortest == _NONE:
                del siblings[node.edge[0]]
            elif node.entry is None and len(node.children) == 1:
                (only,) = node.children.values()
                only.edge = node.edge + only.edge
                siblings[node.edge[0]] = only


def _split(parent: _Node, child: _Node, at: int) -> _Node:
    """Cut ``child``'s edge after ``at`` tokens: the new node in between."""
    middle = _Node(child.edge[:at], {child.edge[at]: child}, None, child.shortest)
    child.edge = child.edge[at:]
    parent.children[middle.edge[0]] = middle
    return middle


def _shared_length(edge: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    """How many of ``edge``'s tokens ``tokens`` repeats from ``start`` on, found by
    comparing slices (in C) rather than token by token in Python."""
    n = min(len(edge), len(tokens) - start)
    if edge[:n] == tuple(tokens[start : start + n]):
        return n
    low, high = 0, n - 1  # edge[:low] is shared, edge[:high + 1] is not
    while low < high:
        mid = (low + high + 1) // 2
        if edge[low:mid] == tuple(tokens[start + low : start + mid]):
            low = mid
        else:
            high = mid - 1
    return low
