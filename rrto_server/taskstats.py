"""
Per-task real-time counters: latency percentiles, deadline misses, preemptions.

A *task* is what a request names in its ``task`` header field (a perception
stream such as ``front_camera/detect``).  For every task the server counts
requests and how each one ended, and keeps a window of recent samples for
percentiles (defined once, in :mod:`rrto_wire.summary`):

* ``latency_ms``  server arrival to reply (the server's share of the round trip)
* ``queue_ms``    server arrival to the start of the first segment
* ``preempt_ms``  ready for the device to the start of the first segment, for
  requests that arrived while a lane was running a less urgent job and
  nothing more urgent was queued or running (the preemption latency; see
  :mod:`rrto_server.scheduler`)

A request *missed its deadline* when it was dropped as expired, abandoned, or
answered after its deadline (``late``).
"""

from __future__ import annotations

import collections
import threading

from rrto_wire.summary import summarise

MAX_TASKS = 256
OVERFLOW_TASK = '(other)'
OUTCOMES = ('completed', 'expired', 'abandoned', 'failed')


class _Task:
    def __init__(self, window: int):
        self.priority = 0
        self.requests = 0
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.late = 0
        self.preemptions = 0
        self.latency = collections.deque(maxlen=window)
        self.queue = collections.deque(maxlen=window)
        self.preempt = collections.deque(maxlen=window)
        self.clients: set[str] = set()     # the keys that sent requests of this task

    def snapshot(self) -> dict:
        missed = self.late + self.counts['expired'] + self.counts['abandoned']
        ended = self.counts['completed'] + self.counts['expired'] + self.counts['abandoned']
        data = {'priority': self.priority, 'requests': self.requests, **self.counts,
                'late': self.late, 'deadline_misses': missed,
                'miss_rate': missed / ended if ended else 0.0,
                'in_flight': self.requests - sum(self.counts.values()),
                'preemptions': self.preemptions,
                'latency_ms': summarise(self.latency), 'queue_ms': summarise(self.queue),
                'preempt_ms': summarise(self.preempt)}
        return data


class TaskStats:
    """Thread-safe per-task counters; at most ``MAX_TASKS`` names, the rest pooled."""

    def __init__(self, window: int = 4096):
        self._window = window
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}

    def _get(self, task: str) -> _Task:
        entry = self._tasks.get(task)
        if entry is None:
            if len(self._tasks) >= MAX_TASKS:
                task = OVERFLOW_TASK
            entry = self._tasks.setdefault(task, _Task(self._window))
        return entry

    def arrived(self, task: str, priority: int, client: str | None = None) -> None:
        """Count a request of ``task`` (sent by key ``client``) accepted for scheduling."""
        with self._lock:
            entry = self._get(task)
            entry.priority = priority
            entry.requests += 1
            if client is not None:
                entry.clients.add(client)

    def ended(self, task: str, outcome: str, latency_s: float, *, late: bool = False,
              queue_s: float | None = None, preempt_s: float | None = None,
              preemptions: int = 0) -> None:
        """Count how one request of ``task`` ended; ``outcome`` is one of OUTCOMES."""
        if outcome not in OUTCOMES:
            raise ValueError(f'outcome must be one of {OUTCOMES}')
        with self._lock:
            entry = self._get(task)
            entry.counts[outcome] += 1
            entry.late += int(late)
            entry.preemptions += preemptions
            if outcome == 'completed':
                entry.latency.append(latency_s * 1e3)
            if queue_s is not None:
                entry.queue.append(queue_s * 1e3)
            if preempt_s is not None:
                entry.preempt.append(preempt_s * 1e3)

    def snapshot(self, client: str | None = None) -> dict:
        """Return every task's counters, or only those of tasks ``client`` sent requests of."""
        with self._lock:
            return {name: entry.snapshot() for name, entry in sorted(self._tasks.items())
                    if client is None or client in entry.clients}
