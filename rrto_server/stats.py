"""Server-side counters: requests and replies by kind, errors by code, per-model work."""

from __future__ import annotations

import collections
import copy
import threading


def _model_counters() -> dict:
    return {'uploads': 0, 'records': 0, 'infers': 0, 'ops': 0, 'errors': 0}


class ServerStats:
    """Thread-safe counters; :meth:`snapshot` returns a JSON-ready copy."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.replies: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped_replies: collections.Counter = collections.Counter()
        self.models: dict[str, dict] = collections.defaultdict(_model_counters)

    def request(self, kind: str, size: int) -> None:
        with self._lock:
            self.requests[kind] += 1
            self.bytes_in += size

    def dropped(self, reason: str) -> None:
        """Count a reply that was never sent (``slow_peer``: its queue was full)."""
        with self._lock:
            self.dropped_replies[reason] += 1

    def reply(self, header: dict, size: int) -> None:
        with self._lock:
            self.replies[header['kind']] += 1
            self.bytes_out += size
            if header['kind'] == 'error':
                self.errors[header['code']] += 1

    def count(self, digest: str, counter: str, n: int = 1) -> None:
        """Add ``n`` to one per-model counter."""
        with self._lock:
            self.models[digest][counter] += n

    def snapshot(self) -> dict:
        with self._lock:
            return {'requests': dict(self.requests), 'replies': dict(self.replies),
                    'errors': dict(self.errors), 'bytes_in': self.bytes_in,
                    'bytes_out': self.bytes_out,
                    'dropped_replies': dict(self.dropped_replies),
                    'models': copy.deepcopy(dict(self.models))}
