"""PrefixCache on fake per-layer caches: lookup, trimming, LRU and byte limits, pruning."""

from __future__ import annotations

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


def nodes(c: PrefixCache) -> int:
    stack, n = [c._root], 0
    while stack:
        node = stack.pop()
        n += len(node.children)
        stack.extend(node.children.values())
    return n


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
