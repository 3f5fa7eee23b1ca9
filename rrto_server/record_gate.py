"""
Recordings in the scheduler: one per client key at a time.

A recording holds every lane (:class:`~rrto_server.recording.RecordJob`), and the
scheduler orders jobs of one priority by arrival: a key that sends 16
recordings of a model already vetted (each one's trial verdict cached) would
put all 16 ahead of another key's.  :class:`RecordGate` lets one recording per
key into the scheduler and keeps the key's others, in order, until it ends;
another key's recording then waits for at most one recording per key.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Hashable

from rrto_server.recording import RecordJob
from rrto_wire.errors import ProtocolError


class RecordGate:
    """At most one :class:`GatedRecordJob` per key in the scheduler; the key's others wait here."""

    def __init__(self, submit: Callable[[RecordJob], None]):
        self._submit = submit
        self._waiting: dict[Hashable, collections.deque] = {}   # a key in here: one running
        self._lock = threading.Lock()

    def submit(self, job: GatedRecordJob) -> None:
        """Hand ``job`` to the scheduler now, or after its key's earlier recordings."""
        with self._lock:
            if job.gate_key in self._waiting:
                self._waiting[job.gate_key].append(job)
                return
            self._waiting[job.gate_key] = collections.deque()
        self._submit(job)

    def done(self, key: Hashable) -> None:
        """Let ``key``'s next recording in (its previous one was answered)."""
        with self._lock:
            queue = self._waiting.get(key)
            if not queue:
                self._waiting.pop(key, None)
                return
            job = queue.popleft()
        self._submit(job)

    def waiting(self) -> int:
        """Return the number of recordings held back."""
        with self._lock:
            return sum(len(queue) for queue in self._waiting.values())


class GatedRecordJob(RecordJob):
    """A :class:`RecordJob` that lets its key's next recording in once it is answered."""

    def __init__(self, gate: RecordGate, gate_key: Hashable, *args):
        super().__init__(*args)
        self.gate, self.gate_key = gate, gate_key

    def complete(self) -> None:
        try:
            super().complete()
        finally:
            self.gate.done(self.gate_key)

    def fail(self, error: ProtocolError) -> None:
        try:
            super().fail(error)
        finally:
            self.gate.done(self.gate_key)
