"""The one least-recently-used cache of the server: a count limit and a weight limit."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar('K', bound=Hashable)
V = TypeVar('V')


class LRU(Generic[K, V]):
    """
    A thread-safe mapping that evicts the least recently used entries.

    It keeps at most ``max_items`` entries whose ``weight`` adds up to at most
    ``max_weight``; the entry just added is never evicted, even if it alone is
    heavier than the limit.
    """

    def __init__(self, max_items: float = math.inf, max_weight: float = math.inf,
                 weight: Callable[[V], int] = lambda value: 0):
        self.max_items = max_items
        self.max_weight = max_weight
        self._weight_of = weight
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.weight = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        """Return the value of ``key`` (now the most recently used) or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Add or replace ``key``, then evict beyond the limits."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.weight -= self._weight_of(old)
            self._entries[key] = value
            self.weight += self._weight_of(value)
            while len(self._entries) > 1 and (len(self._entries) > self.max_items
                                              or self.weight > self.max_weight):
                _, evicted = self._entries.popitem(last=False)
                self.weight -= self._weight_of(evicted)
                self.evictions += 1

    def pop(self, key: K) -> V | None:
        """Remove ``key``; return its value or None."""
        with self._lock:
            value = self._entries.pop(key, None)
            if value is not None:
                self.weight -= self._weight_of(value)
            return value

    def values(self) -> list[V]:
        """Return the values, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
