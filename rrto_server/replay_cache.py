"""
Recorded replays, bounded in count and bytes, shared fairly between client keys.

Every replay is owned by the keys that asked for it (``record`` requests, also
those that found it recorded already); each owner pays for it in full against
its own quota (``Grant.max_replays`` and ``Grant.replay_bytes``, see
:mod:`rrto_server.auth`).  Two rules keep one key from pushing another's
replays out:

* a key over its quota gives up its own least recently used replays first; a
  replay it shares only loses that key as an owner, and a replay goes when no
  owner is left;
* when the server's own limits (``max_replays``, ``max_bytes``) are exceeded,
  the key that uses the most (bytes when the byte limit is exceeded, else
  count; on a tie, the key whose new replay exceeded the limit) gives up its
  least recently used replay: evicted if it owns it alone, else it only stops
  being an owner (so co-owning another key's replay never gets it evicted).

A server without keys serves everyone as one owner, so both rules reduce to
plain least-recently-used eviction.  The replay just added is never evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable

from rrto_server.auth import ANONYMOUS, Peer
from rrto_server.replay import Replay
from rrto_wire import heap


class ReplayCache:
    """The server's recorded replays by key (see :func:`rrto_server.replay_key.replay_key`)."""

    def __init__(self, max_replays: int = 32, max_bytes: int = 8 << 30):
        self.max_replays = max_replays
        self.max_bytes = max_bytes
        self._replays: OrderedDict[str, Replay] = OrderedDict()   # least recently used first
        self._owners: dict[str, set[str]] = {}                    # replay key -> owner names
        self._grants: dict[str, Peer] = {}                        # owner name -> its peer
        self._lock = threading.Lock()
        self.nbytes = 0
        self.evictions = 0

    def get(self, key: str) -> Replay | None:
        """Return the replay of ``key`` (now the most recently used) or None."""
        with self._lock:
            replay = self._replays.get(key)
            if replay is not None:
                self._replays.move_to_end(key)
            return replay

    def claim(self, key: str, owner: Peer | None) -> Replay | None:
        """Like :meth:`get`, and make ``owner`` pay for the replay too (a ``record`` hit)."""
        with self._lock:
            replay = self._replays.get(key)
            if replay is not None:
                self._replays.move_to_end(key)
                if owner is not None and owner.name not in self._owners[key]:
                    self._owners[key].add(owner.name)
                    self._grants[owner.name] = owner
                    self._fit_quota(owner.name, key)
            return replay

    def add(self, replay: Replay, owners: Iterable[Peer] = ()) -> None:
        """Keep ``replay`` for ``owners`` (none: the server's own), then evict beyond limits."""
        owners = list(owners) or [ANONYMOUS]
        with self._lock:
            key = replay.key
            self._drop(key)
            self._replays[key] = replay
            self._owners[key] = {o.name for o in owners}
            self.nbytes += replay.nbytes
            for owner in owners:
                self._grants[owner.name] = owner
            for owner in owners:
                self._fit_quota(owner.name, key)
            self._fit_server(key)

    def remove_model(self, digest: str) -> int:
        """Drop every replay of the model ``digest``; return how many went."""
        with self._lock:
            keys = [k for k, r in self._replays.items() if r.model.digest == digest]
            for key in keys:
                self._drop(key)
            return len(keys)

    def usage(self) -> dict[str, dict[str, int]]:
        """Return each owner's replays and bytes (what its quota is measured against)."""
        with self._lock:
            return {name: {'replays': len(keys), 'bytes': self._bytes(keys)}
                    for name, keys in self._by_owner().items()}

    def __len__(self) -> int:
        return len(self._replays)

    def items(self) -> list[Replay]:
        """Return the replays, least recently used first."""
        with self._lock:
            return list(self._replays.values())

    # ------------------------------------------------------------------ eviction (locked)
    def _drop(self, key: str) -> None:
        replay = self._replays.pop(key, None)
        if replay is not None:
            self.nbytes -= replay.nbytes
            del self._owners[key]
            heap.dropped(replay, nbytes=replay.nbytes)    # its frozen cycles go at a due settle

    def _by_owner(self) -> dict[str, list[str]]:
        """Return each owner's replay keys, least recently used first."""
        owned: dict[str, list[str]] = {}
        for key in self._replays:
            for name in self._owners[key]:
                owned.setdefault(name, []).append(key)
        return owned

    def _bytes(self, keys: list[str]) -> int:
        return sum(self._replays[k].nbytes for k in keys)

    def _fit_quota(self, name: str, keep: str) -> None:
        """Make ``name`` give up its oldest replays (never ``keep``) until within its grant."""
        grant = self._grants[name].grant
        keys = self._by_owner().get(name, [])
        while len(keys) > grant.max_replays or self._bytes(keys) > grant.replay_bytes:
            victims = [k for k in keys if k != keep]
            if not victims:
                return
            self._disown(name, victims[0])
            keys.remove(victims[0])

    def _disown(self, name: str, key: str) -> None:
        """Make ``name`` stop paying for ``key``; the replay goes with its last owner."""
        self._owners[key].discard(name)
        if not self._owners[key]:
            self._drop(key)
            self.evictions += 1

    def _fit_server(self, keep: str) -> None:
        """
        Take the heaviest owner's oldest replays (never ``keep``) until within limits.

        A replay that owner shares only loses it as an owner (its usage no longer
        counts it); one it owns alone is evicted.
        """
        while len(self._replays) > self.max_replays or self.nbytes > self.max_bytes:
            by_bytes = self.nbytes > self.max_bytes
            order = list(self._replays)
            owned = self._by_owner()
            victims = {name: [k for k in keys if k != keep] for name, keys in owned.items()}

            def weight(name: str) -> tuple:
                used = self._bytes(owned[name]) if by_bytes else len(owned[name])
                # ties: the key that added ``keep`` gives way, then the oldest replay goes
                return used, name in self._owners[keep], -order.index(victims[name][0])
            heaviest = max((n for n in victims if victims[n]), key=weight, default=None)
            if heaviest is None:
                return
            self._disown(heaviest, victims[heaviest][0])
