"""The token radix trie that finds the longest cached prefix."""

from __future__ import annotations

import random

from hivebridge.inference.local.prefix_trie import RadixTrie


def brute(stored: dict[str, tuple[int, ...]], query: list[int]) -> int:
    best = 0
    for toks in stored.values():
        n = 0
        while n < min(len(toks), len(query)) and toks[n] == query[n]:
            n += 1
        best = max(best, n)
    return best


def test_empty_trie_matches_nothing() -> None:
    trie: RadixTrie[str] = RadixTrie()
    assert trie.longest_prefix([1, 2, 3]) == (None, 0)


def test_longest_prefix_picks_deepest() -> None:
    trie: RadixTrie[str] = RadixTrie()
    trie.insert("persona", [1, 2, 3])
    trie.insert("room", [1, 2, 3, 4, 5, 6])
    assert trie.longest_prefix([1, 2, 3, 4, 9]) == ("room", 4)
    assert trie.longest_prefix([1, 2, 7]) in (("persona", 2), ("room", 2))
    assert trie.longest_prefix([1, 2, 3]) in (("persona", 3), ("room", 3))
    assert trie.longest_prefix([9]) == (None, 0)


def test_preferred_key_wins_ties() -> None:
    trie: RadixTrie[int] = RadixTrie()
    trie.insert(1, [5, 6, 7, 8])
    trie.insert(2, [5, 6, 7, 9])
    assert trie.longest_prefix([5, 6, 7, 0], preferred=[2]) == (2, 3)
    assert trie.longest_prefix([5, 6, 7, 0], preferred=[1]) == (1, 3)
    # a preferred key with a shorter match does not beat a longer one
    trie.insert(3, [5])
    assert trie.longest_prefix([5, 6, 7, 8], preferred=[3]) == (1, 4)


def test_query_shorter_than_stored() -> None:
    trie: RadixTrie[str] = RadixTrie()
    trie.insert("a", [1, 2, 3, 4])
    assert trie.longest_prefix([1, 2]) == ("a", 2)


def test_remove_and_reinsert() -> None:
    trie: RadixTrie[str] = RadixTrie()
    trie.insert("a", [1, 2, 3])
    trie.insert("b", [1, 2, 4])
    trie.remove("a")
    assert "a" not in trie and len(trie) == 1
    assert trie.longest_prefix([1, 2, 3]) == ("b", 2)
    trie.insert("b", [7, 8])  # replacing a key moves it
    assert trie.longest_prefix([1, 2]) == (None, 0)
    assert trie.longest_prefix([7, 8, 9]) == ("b", 2)
    trie.remove("missing")  # ignored


def test_empty_token_list_key() -> None:
    trie: RadixTrie[str] = RadixTrie()
    trie.insert("empty", [])
    assert trie.longest_prefix([1]) == (None, 0)
    trie.remove("empty")
    assert len(trie) == 0


def test_randomized_against_brute_force() -> None:
    rng = random.Random(1234)
    trie: RadixTrie[str] = RadixTrie()
    stored: dict[str, tuple[int, ...]] = {}
    base = [rng.randrange(4) for _ in range(40)]
    for step in range(600):
        op = rng.random()
        if op < 0.5 or not stored:
            key = f"k{rng.randrange(25)}"
            cut = rng.randrange(len(base))
            toks = tuple(base[:cut] + [rng.randrange(4) for _ in range(rng.randrange(8))])
            trie.insert(key, toks)
            stored[key] = toks
        elif op < 0.7:
            key = rng.choice(sorted(stored))
            trie.remove(key)
            del stored[key]
        query = base[: rng.randrange(len(base))] + [rng.randrange(4) for _ in range(5)]
        found, n = trie.longest_prefix(query)
        assert n == brute(stored, query), step
        if found is not None:
            assert tuple(stored[found][:n]) == tuple(query[:n])
        assert len(trie) == len(stored)
