"""Recorded replays, least recently used evicted beyond a count or a byte budget."""

from __future__ import annotations

from rrto_server.lru import LRU
from rrto_server.replay import Replay


class ReplayCache:
    """The server's recorded replays by key (see :func:`rrto_server.replay_key.replay_key`)."""

    def __init__(self, max_replays: int = 32, max_bytes: int = 8 << 30):
        self._lru: LRU[str, Replay] = LRU(max_replays, max_bytes, lambda r: r.nbytes)

    def get(self, key: str) -> Replay | None:
        return self._lru.get(key)

    def add(self, replay: Replay) -> None:
        self._lru.put(replay.key, replay)

    @property
    def nbytes(self) -> int:
        return self._lru.weight

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    def __len__(self) -> int:
        return len(self._lru)

    def items(self) -> list[Replay]:
        return self._lru.values()
