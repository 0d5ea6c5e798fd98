"""A token radix trie: which stored token list shares the longest prefix with a prompt?

Keys are opaque (sequence ids, snapshot keys). Every node knows the keys in its
subtree, so a lookup is one walk down the prompt: O(len(prompt)), independent
of how many sequences are stored.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class _Node(Generic[K]):
    __slots__ = ("children", "edge", "ends", "keys")

    def __init__(self, edge: tuple[int, ...]) -> None:
        self.edge = edge
        self.children: dict[int, _Node[K]] = {}
        self.keys: set[K] = set()  # keys whose token list runs through this node
        self.ends: set[K] = set()  # keys whose token list ends exactly here


def _common(a: Sequence[int], b: Sequence[int], start: int) -> int:
    """Length of the common prefix of ``a`` and ``b[start:]``."""
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


class RadixTrie(Generic[K]):
    """Maps keys to token lists; finds the key with the longest common prefix."""

    def __init__(self) -> None:
        self._root: _Node[K] = _Node(())
        self._tokens: dict[K, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, key: object) -> bool:
        return key in self._tokens

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._tokens))

    def tokens(self, key: K) -> tuple[int, ...]:
        return self._tokens[key]

    def insert(self, key: K, tokens: Iterable[int]) -> None:
        """Store ``tokens`` under ``key``, replacing what the key held before."""
        toks = tuple(tokens)
        if key in self._tokens:
            self.remove(key)
        self._tokens[key] = toks
        node = self._root
        node.keys.add(key)
        i = 0
        while i < len(toks):
            child = node.children.get(toks[i])
            if child is None:
                leaf: _Node[K] = _Node(toks[i:])
                leaf.keys.add(key)
                leaf.ends.add(key)
                node.children[toks[i]] = leaf
                return
            common = _common(child.edge, toks, i)
            if common < len(child.edge):
                mid: _Node[K] = _Node(child.edge[:common])
                mid.keys = set(child.keys)
                child.edge = child.edge[common:]
                mid.children[child.edge[0]] = child
                node.children[toks[i]] = mid
                child = mid
            child.keys.add(key)
            i += common
            node = child
        node.ends.add(key)

    def remove(self, key: K) -> None:
        """Forget ``key``; a missing key is ignored."""
        toks = self._tokens.pop(key, None)
        if toks is None:
            return
        path: list[_Node[K]] = [self._root]
        node = self._root
        node.keys.discard(key)
        i = 0
        while i < len(toks):
            child = node.children[toks[i]]
            child.keys.discard(key)
            path.append(child)
            i += len(child.edge)
            node = child
        node.ends.discard(key)
        # Prune empty nodes bottom-up and merge pass-through nodes into their child.
        for depth in range(len(path) - 1, 0, -1):
            cur, parent = path[depth], path[depth - 1]
            first = cur.edge[0]
            if not cur.keys:
                del parent.children[first]
            elif not cur.ends and len(cur.children) == 1:
                (only,) = cur.children.values()
                only.edge = cur.edge + only.edge
                parent.children[first] = only

    def longest_prefix(
        self, tokens: Sequence[int], preferred: Iterable[K] = ()
    ) -> tuple[K | None, int]:
        """(key, n): a key whose tokens share the longest prefix (n tokens) with ``tokens``.

        Among keys sharing that prefix, the first of ``preferred`` that qualifies
        wins (e.g. the room's own sequence, which can be truncated in place);
        otherwise the choice is deterministic (smallest by repr).
        """
        node = self._root
        i = 0
        candidates: set[K] = set()
        depth = 0
        while True:
            if i >= len(tokens):
                candidates, depth = node.keys, i
                break
            child = node.children.get(tokens[i])
            if child is None:
                candidates, depth = node.keys, i
                break
            common = _common(child.edge, tokens, i)
            if common < len(child.edge):
                candidates, depth = child.keys, i + common
                break
            i += common
            node = child
        if depth == 0 or not candidates:
            return None, 0
        for key in preferred:
            if key in candidates:
                return key, depth
        return min(candidates, key=repr), depth
