"""Containers with a ceiling: state keyed by something outsiders choose (rooms,
transaction ids) must not grow without bound, however many of them arrive."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LruDict(Generic[K, V]):
    """A dict of at most ``max_items``; the least recently used entry goes first.

    For caches only: what it forgets must be cheap to rebuild (read again from
    the database or the state store, or start afresh).
    """

    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.max_items = max_items
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def setdefault(self, key: K, factory: Callable[[], V]) -> V:
        value = self.get(key)
        if value is None:
            value = self[key] = factory()
        return value

    def __getitem__(self, key: K) -> V:
        value = self._items[key]
        self._items.move_to_end(key)
        return value

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def pop(self, key: K, default: V | None = None) -> V | None:
        return self._items.pop(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def clear(self) -> None:
        self._items.clear()


class RecentSet(Generic[K]):
    """The last ``max_items`` keys added (a set that forgets its oldest members)."""

    def __init__(self, max_items: int) -> None:
        self._items: LruDict[K, bool] = LruDict(max_items)

    def add(self, key: K) -> None:
        self._items[key] = True

    def discard(self, key: K) -> None:
        self._items.pop(key)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
