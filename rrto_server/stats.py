"""
Server-side counters: requests and replies by kind, errors by code, per-model work.

Also the garbage collector's pauses (:meth:`ServerStats.collection`, a ``gc.callbacks``
entry the server installs): a collection holds every thread of the process, the
I/O thread's receipt of an urgent frame included, and a full one of a server with
torch loaded took 128-148 ms on a 2-core VM.
"""

from __future__ import annotations

import collections
import copy
import threading
import time

PAUSE_MS = 1.0          # collections at least this long are kept with their start time
PAUSES_KEPT = 64


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
        # per generation [collections, total ms, longest ms]; (start, ms, generation) of the
        # last long ones.  Written by the collecting thread without a lock: it may hold this
        # object's lock already when the collection starts.
        self.gc = {generation: [0, 0.0, 0.0] for generation in range(3)}
        self.pauses: collections.deque = collections.deque(maxlen=PAUSES_KEPT)
        self._gc_start = 0.0

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

    def collection(self, phase: str, info: dict) -> None:
        """Time each garbage collection; installed in ``gc.callbacks`` by the server."""
        now = time.perf_counter()
        if phase == 'start':
            self._gc_start = now
            return
        ms = (now - self._gc_start) * 1e3
        entry = self.gc[info['generation']]
        entry[0] += 1
        entry[1] += ms
        entry[2] = max(entry[2], ms)
        if ms >= PAUSE_MS:
            self.pauses.append((self._gc_start, ms, info['generation']))

    def snapshot(self) -> dict:
        """Return the counters as JSON data (``gc_pauses``: start on the perf_counter clock)."""
        with self._lock:
            return {'requests': dict(self.requests), 'replies': dict(self.replies),
                    'errors': dict(self.errors), 'bytes_in': self.bytes_in,
                    'bytes_out': self.bytes_out,
                    'dropped_replies': dict(self.dropped_replies),
                    'models': copy.deepcopy(dict(self.models)),
                    'gc': {str(g): {'collections': n, 'total_ms': total, 'longest_ms': most}
                           for g, (n, total, most) in self.gc.items()},
                    'gc_pauses': [{'start': start, 'ms': ms, 'generation': g}
                                  for start, ms, g in list(self.pauses)]}
