"""PrefixCache on fake per-layer caches: lookup, trimming, LRU and byte limits, pruning."""

from __future__ import annotations

import random

import pytest

from engine.prefix_cache import PrefixCache

# KV bytes per token of the (imaginary) model: an entry's size is its tokens x this.
BPT = 10


class FakeLayer:
    """Stands in for one layer's KVCache: a token count, a size, trim, and copies counted."""

    copies = 0

    def __init__(self, tokens: int, nbytes: int = 10, trimmable: bool = True) -> None:
        self.tokens, self.nbytes, self.trimmable = tokens, nbytes, trimmable

    def is_trimmable(self) -> bool:
        return self.trimmable

    def trim(self, n: int) -> int:
        self.tokens -= n
        return n

    def __deepcopy__(self, memo: dict) -> FakeLayer:
        FakeLayer.copies += 1
        return FakeLayer(self.tokens, self.nbytes, self.trimmable)


def cache_for(tokens: list[int], nbytes: int = 10, trimmable: bool = True) -> list[FakeLayer]:
    return [FakeLayer(len(tokens), nbytes, trimmable), FakeLayer(len(tokens), nbytes, trimmable)]


@pytest.fixture(autouse=True)
def count_copies():
    FakeLayer.copies = 0


def walk(c: PrefixCache) -> tuple[int, int]:
    """(trie nodes below the root, tokens on their edges: the positions a per-token trie has)."""
    stack, n, tokens = [c._root], 0, 0
    while stack:
        node = stack.pop()
        n += len(node.children)
        tokens += sum(len(child.edge) for child in node.children.values())
        stack.extend(node.children.values())
    return n, tokens


def nodes(c: PrefixCache) -> int:
    return walk(c)[1]


def test_a_prompt_that_extends_an_entry_reuses_all_of_it():
    c = PrefixCache(1 << 20, 8, BPT)
    c.insert([1, 2, 3, 4], cache_for([1, 2, 3, 4]))
    cache, rest = c.fetch([1, 2, 3, 4, 5, 6])
    assert rest == [5, 6] and [layer.tokens for layer in cache] == [4, 4]


def test_an_entry_longer_than_the_shared_prefix_is_copied_and_trimmed():
    c = PrefixCache(1 << 20, 8, BPT)
    stored = cache_for([1, 2, 3, 4, 5, 6])
    c.insert([1, 2, 3, 4, 5, 6], stored)
    cache, rest = c.fetch([1, 2, 3, 9])
    assert rest == [9] and [layer.tokens for layer in cache] == [3, 3]
    assert [layer.tokens for layer in stored] == [6, 6]  # the entry itself is untouched


def test_an_exact_match_leaves_the_last_token_to_prefill():
    c = PrefixCache(1 << 20, 8, BPT)
    c.insert([1, 2, 3], cache_for([1, 2, 3]))
    cache, rest = c.fetch([1, 2, 3])
    assert rest == [3] and [layer.tokens for layer in cache] == [2, 2]


def test_untrimmable_caches_are_reused_only_as_whole_prefixes():
    c = PrefixCache(1 << 20, 8, BPT)
    c.insert([1, 2], cache_for([1, 2], trimmable=False))
    c.insert([1, 2, 3, 4], cache_for([1, 2, 3, 4], trimmable=False))
    assert len(c) == 2  # an untrimmable entry does not stand in for its prefixes
    cache, rest = c.fetch([1, 2, 3, 4])  # the exact one cannot give back its last token
    assert rest == [3, 4] and [layer.tokens for layer in cache] == [2, 2]
    cache, rest = c.fetch([1, 2, 3, 7])
    assert rest == [3, 7] and [layer.tokens for layer in cache] == [2, 2]


def test_shared_prefixes_shorter_than_min_reuse_are_not_even_copied():
    c = PrefixCache(1 << 20, 8, BPT, min_reuse=4)
    c.insert([1, 2, 3, 4, 5, 6], cache_for([1, 2, 3, 4, 5, 6]))
    assert c.fetch([1, 2, 3, 9, 9]) == (None, [1, 2, 3, 9, 9])
    assert FakeLayer.copies == 0
    cache, rest = c.fetch([1, 2, 3, 4, 9])
    assert rest == [9] and FakeLayer.copies == 2


def test_a_prefix_too_short_to_reuse_walks_no_entry(monkeypatch):
    """A lookup sharing only a chat template's head with long entries (most prompts)
    stops at the shared prefix: walking an entry costs a Python step per token, in
    the engine's socket loop, for every request of a burst."""
    c = PrefixCache(1 << 30, 100, BPT, min_reuse=8)
    for i in range(20):
        tokens = [1, 2, 3, 100 + i, *range(1000, 1400)]
        c.insert(tokens, cache_for(tokens))
    descents: list[object] = []
    walk = PrefixCache._shortest_entry_below
    monkeypatch.setattr(
        PrefixCache, "_shortest_entry_below", staticmethod(lambda node: descents.append(node) or walk(node))
    )
    assert c.fetch([1, 2, 3, 7, 7, 7, 7, 7, 7, 7]) == (None, [1, 2, 3, 7, 7, 7, 7, 7, 7, 7])
    assert descents == [] and FakeLayer.copies == 0
    cache, rest = c.fetch([1, 2, 3, 100, 1000, 1001, 1002, 1003, 1004, 9])
    assert len(descents) == 1 and rest == [9] and [layer.tokens for layer in cache] == [9, 9]


def test_no_shared_token_means_no_cache():
    c = PrefixCache(1 << 20, 8, BPT)
    c.insert([1, 2, 3], cache_for([1, 2, 3]))
    assert c.fetch([7, 8]) == (None, [7, 8])
    assert c.fetch([]) == (None, [])


def test_a_longer_trimmable_entry_replaces_its_prefixes():
    c = PrefixCache(1 << 20, 8, BPT)
    c.insert([1, 2], cache_for([1, 2]))
    c.insert([1, 2, 3], cache_for([1, 2, 3]))
    assert len(c) == 1 and c.nbytes == 3 * BPT


def test_least_recently_used_entries_go_first_and_a_hit_counts_as_use():
    c = PrefixCache(1 << 20, 2, BPT)
    c.insert([1, 1], cache_for([1, 1]))
    c.insert([2, 2], cache_for([2, 2]))
    c.fetch([1, 1, 5])  # [1, 1] is now the most recently used
    c.insert([3, 3], cache_for([3, 3]))
    assert c.fetch([2, 2, 5]) == (None, [2, 2, 5])
    assert c.fetch([1, 1, 5])[1] == [5] and c.fetch([3, 3, 5])[1] == [5]


def test_the_byte_cap_evicts_and_trim_to_shrinks_further():
    c = PrefixCache(50, 100, BPT)
    for first in range(1, 5):
        c.insert([first, 9], cache_for([first, 9]))  # 2 tokens: 20 bytes each
    assert len(c) == 2 and c.nbytes == 40
    c.trim_to(20)
    assert len(c) == 1 and c.fetch([4, 9, 1])[1] == [1]
    c.trim_to(0)
    assert len(c) == 0 and c.nbytes == 0 and nodes(c) == 0


def test_reinserting_the_same_tokens_replaces_the_entry():
    c = PrefixCache(1 << 20, 8, BPT)
    c.insert([1, 2], cache_for([1, 2], nbytes=10))
    c.insert([1, 2], cache_for([1, 2], nbytes=30))
    replacement = c.fetch([1, 2, 3])[0]
    assert len(c) == 1 and replacement is not None and [layer.nbytes for layer in replacement] == [30, 30]


def test_entries_count_tokens_times_bytes_per_token_not_their_arrays():
    """Every rank of a sharded engine holds its own part of each cache: sizes
    counted from tokens are the same on all of them, so are evictions."""
    c = PrefixCache(1 << 20, 8, BPT)
    c.insert([1, 2, 3], cache_for([1, 2, 3], nbytes=1000))
    c.insert([4, 5], cache_for([4, 5], nbytes=1))
    assert c.nbytes == 5 * BPT


def test_evicted_branches_are_pruned_and_shared_ones_kept():
    c = PrefixCache(1 << 20, 8, BPT)
    c.insert([1, 2, 3], cache_for([1, 2, 3]))
    c.insert([1, 2, 7, 8], cache_for([1, 2, 7, 8]))
    assert nodes(c) == 5
    c.trim_to(1 << 20, n_entries=1)  # drops [1, 2, 3]: only its own node goes
    assert nodes(c) == 4
    cache, rest = c.fetch([1, 2, 3])
    assert rest == [3] and [layer.tokens for layer in cache] == [2, 2]


def test_lookups_find_an_entry_below_many_siblings_in_one_descent():
    """The shared prefix is short, the entries below it many: one copy, the right trim."""
    c = PrefixCache(1 << 30, 1000, BPT)
    for i in range(300):
        tokens = [1, 2, 3] + [100 + i] + list(range(500, 540))
        c.insert(tokens, cache_for(tokens))
    cache, rest = c.fetch([1, 2, 3, 99])
    assert rest == [99] and [layer.tokens for layer in cache] == [3, 3] and FakeLayer.copies == 2


def test_the_shortest_entry_below_the_shared_prefix_is_the_one_copied():
    """Any entry below would do once trimmed; the shortest is the cheapest copy."""
    c = PrefixCache(1 << 30, 100, BPT)
    long_one = [1, 2, 3, 4] + list(range(10, 60))
    c.insert(long_one, cache_for(long_one, nbytes=500))
    c.insert([1, 2, 3, 5, 6, 7], cache_for([1, 2, 3, 5, 6, 7], nbytes=5))
    c.insert([1, 2, 3, 4, 9, 9, 9], cache_for([1, 2, 3, 4, 9, 9, 9], nbytes=7))
    cache, rest = c.fetch([1, 2, 3, 8])
    assert rest == [8] and [layer.nbytes for layer in cache] == [5, 5]  # the 6-token entry
    cache, rest = c.fetch([1, 2, 3, 4, 8])
    assert rest == [8] and [layer.nbytes for layer in cache] == [7, 7]  # the 7-token one, not the 54
    c.trim_to(1 << 30, n_entries=1)  # only the newest, [1, 2, 3, 4, 9, 9, 9], stays
    cache, rest = c.fetch([1, 2, 3, 8])
    assert rest == [8] and [layer.nbytes for layer in cache] == [7, 7]


def test_entries_cost_about_two_nodes_each_whatever_their_length():
    """A node per token would make long prompts hundreds of thousands of Python
    objects that every full garbage collection walks (an engine stall)."""
    c = PrefixCache(1 << 30, 1000, BPT)
    for i in range(50):
        tokens = [1, 2, 3, 100 + i % 7, 200 + i, *range(1000, 1400)]
        c.insert(tokens, cache_for(tokens))
    n, tokens_on_edges = walk(c)
    assert len(c) == 50 and n <= 2 * len(c) and tokens_on_edges > 50 * 400


class Reference:
    """PrefixCache's contract by brute force over its entries, oldest first."""

    def __init__(self, max_bytes: int, max_entries: int, min_reuse: int) -> None:
        self.max_bytes, self.max_entries, self.min_reuse = max_bytes, max_entries, min_reuse
        self.entries: dict[tuple[int, ...], bool] = {}  # tokens -> trimmable

    def fetch(self, tokens: list[int]) -> tuple[int | None, list[int]]:
        """(tokens in the copied cache or None, tokens left to prefill)."""

        def shared(key: tuple[int, ...]) -> int:
            n = 0
            while n < min(len(key), len(tokens)) and key[n] == tokens[n]:
                n += 1
            return n

        depth = max(map(shared, self.entries), default=0)
        usable = min(depth, len(tokens) - 1)
        if usable >= self.min_reuse:
            deeper = min((k for k in self.entries if shared(k) == depth), key=len)
            if self.entries[deeper]:
                self._use(deeper)
                return usable, tokens[usable:]
        prefixes = [k for k in self.entries if len(k) < len(tokens) and shared(k) == len(k)]
        prefix = max(prefixes, key=len, default=None)
        if prefix is not None and len(prefix) >= self.min_reuse:
            self._use(prefix)
            return len(prefix), tokens[len(prefix) :]
        return None, tokens

    def _use(self, key: tuple[int, ...]) -> None:
        self.entries[key] = self.entries.pop(key)

    def insert(self, tokens: list[int], trimmable: bool) -> None:
        key = tuple(tokens)
        self.entries.pop(key, None)
        if trimmable:
            for other in [k for k in self.entries if len(k) < len(key) and key[: len(k)] == k]:
                del self.entries[other]
        self.entries[key] = trimmable
        self.trim_to(self.max_bytes, self.max_entries)

    def trim_to(self, n_bytes: int, n_entries: int | None = None) -> None:
        limit = len(self.entries) if n_entries is None else n_entries
        while self.entries and (sum(map(len, self.entries)) * BPT > n_bytes or len(self.entries) > limit):
            del self.entries[next(iter(self.entries))]


def check_tree(c: PrefixCache) -> None:
    """Every node leads to an entry, none but the root is a bare pass-through,
    and each knows the shortest entry below it."""

    def shortest(node) -> int:
        own = [len(node.entry.tokens)] if node.entry is not None else []
        return min(own + [shortest(child) for child in node.children.values()], default=1 << 62)

    stack = [(c._root, ())]
    while stack:
        node, path = stack.pop()
        assert node.shortest == shortest(node)
        if node is not c._root:
            assert node.entry is not None or len(node.children) >= 2
        if node.entry is not None:
            assert node.entry.tokens == path
        for first, child in node.children.items():
            assert child.edge and child.edge[0] == first
            stack.append((child, path + child.edge))


@pytest.mark.parametrize("seed", range(12))
def test_random_use_matches_the_brute_force_contract(seed):
    """Inserts (trimmable or not, new or again), lookups and evictions over a
    3-token alphabet (many shared prefixes and branch points) agree with a brute
    force search of the entries, and the tree stays compressed and consistent.
    Entry lengths are distinct, so "the shortest entry below" is one entry."""
    rng = random.Random(seed)
    min_reuse = rng.choice([1, 3])
    c = PrefixCache(60 * BPT, 6, BPT, min_reuse=min_reuse)
    ref = Reference(60 * BPT, 6, min_reuse)
    lengths = list(range(1, 30))
    rng.shuffle(lengths)
    for _ in range(250):
        op = rng.random()
        if op < 0.35 and lengths:
            tokens = [rng.choice([1, 2, 3]) for _ in range(lengths.pop())]
            if any(len(k) == len(tokens) for k in ref.entries):
                continue
            trimmable = rng.random() < 0.8
            c.insert(tokens, cache_for(tokens, trimmable=trimmable))
            ref.insert(tokens, trimmable)
        elif op < 0.45 and ref.entries:
            key = rng.choice(list(ref.entries))
            c.insert(list(key), cache_for(list(key), trimmable=ref.entries[key]))
            ref.insert(list(key), ref.entries[key])
        elif op < 0.5:
            n_bytes = rng.randrange(0, 60) * BPT
            c.trim_to(n_bytes)
            ref.trim_to(n_bytes)
            lengths = [n for n in range(1, 30) if all(len(k) != n for k in ref.entries)]
            rng.shuffle(lengths)
        else:
            base = list(rng.choice(list(ref.entries))) if ref.entries and rng.random() < 0.7 else []
            tokens = base[: rng.randrange(len(base) + 1)] + [rng.choice([1, 2, 3]) for _ in range(rng.randrange(4))]
            cache, rest = c.fetch(tokens)
            copied, ref_rest = ref.fetch(tokens)
            assert rest == ref_rest
            assert (None if cache is None else [layer.tokens for layer in cache]) == (
                None if copied is None else [copied, copied]
            )
        assert list(c._lru) == list(ref.entries)
        assert c.nbytes == sum(map(len, ref.entries)) * BPT
        check_tree(c)
