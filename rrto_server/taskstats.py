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

A task name is the sender's choice, so the counters are kept per (key, task):
two keys that send the same name have two entries, and each key reads and
writes only its own (:meth:`TaskStats.snapshot`; an admin sees them all,
:meth:`TaskStats.by_key`).  A key has at most ``MAX_TASKS`` names; its later
names pool into its own ``OVERFLOW_TASK`` entry, as do every key's new names once
all keys together hold ``MAX_ENTRIES`` (memory, and the admin's stats time).  A
server without keys has one identity (``None``): every request is its own.
"""

from __future__ import annotations

import collections
import threading

from rrto_wire.summary import summarise

MAX_TASKS = 256            # names per key
MAX_ENTRIES = 1024         # (key, task) entries of all keys together
OVERFLOW_TASK = '(other)'
ANONYMOUS = 'anonymous'    # the identity of a server without keys, in by_key()
OUTCOMES = ('completed', 'expired', 'abandoned', 'failed')


class _Task:
    def __init__(self, window: int | None):
        self.priority = 0
        self.requests = 0
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.late = 0
        self.preemptions = 0
        self.latency = collections.deque(maxlen=window)
        self.queue = collections.deque(maxlen=window)
        self.preempt = collections.deque(maxlen=window)

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
    """Thread-safe counters per (key, task); a key reads and writes only its own entries."""

    def __init__(self, window: int = 4096):
        self._window = window
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str | None, str], _Task] = {}
        self._names: collections.Counter = collections.Counter()    # entries per key

    def _get(self, client: str | None, task: str) -> _Task:
        entry = self._tasks.get((client, task))
        if entry is None:
            if self._names[client] >= MAX_TASKS or len(self._tasks) >= MAX_ENTRIES:
                task = OVERFLOW_TASK        # one per key at most past the caps
            entry = self._tasks.get((client, task))
            if entry is None:
                entry = self._tasks[client, task] = _Task(self._window)
                self._names[client] += 1
        return entry

    def arrived(self, task: str, priority: int, client: str | None = None) -> None:
        """Count a request of ``task`` sent by key ``client`` accepted for scheduling."""
        with self._lock:
            entry = self._get(client, task)
            entry.priority = priority
            entry.requests += 1

    def ended(self, task: str, outcome: str, latency_s: float, *, client: str | None = None,
              late: bool = False, queue_s: float | None = None,
              preempt_s: float | None = None, preemptions: int = 0) -> None:
        """Count the outcome (one of OUTCOMES) of a request of ``task`` sent by ``client``."""
        if outcome not in OUTCOMES:
            raise ValueError(f'outcome must be one of {OUTCOMES}')
        with self._lock:
            entry = self._get(client, task)
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
        """Return the counters of ``client``'s tasks (None: an open server's), by name."""
        with self._lock:
            return {task: entry.snapshot() for (key, task), entry in
                    sorted(self._tasks.items(), key=_order) if key == client}

    def by_key(self) -> dict:
        """Return every key's tasks, ``{key: {task: counters}}`` (admins; None: ANONYMOUS)."""
        with self._lock:
            data: dict = {}
            for (key, task), entry in sorted(self._tasks.items(), key=_order):
                data.setdefault(ANONYMOUS if key is None else key, {})[task] = entry.snapshot()
            return data

    def totals(self) -> dict:
        """Return each task name's counters over all keys (for admins), by name."""
        with self._lock:
            groups: dict[str, list[_Task]] = {}
            for (_, task), entry in sorted(self._tasks.items(), key=_order):
                groups.setdefault(task, []).append(entry)
            return {task: (entries[0] if len(entries) == 1 else _merged(entries)).snapshot()
                    for task, entries in groups.items()}


def _order(item: tuple) -> tuple:
    (key, task), _ = item
    return task, key or ''


def _merged(entries: list[_Task]) -> _Task:
    total = _Task(None)
    total.priority = max(entry.priority for entry in entries)     # the most urgent sender's
    for entry in entries:
        total.requests += entry.requests
        total.late += entry.late
        total.preemptions += entry.preemptions
        for outcome in OUTCOMES:
            total.counts[outcome] += entry.counts[outcome]
        total.latency.extend(entry.latency)
        total.queue.extend(entry.queue)
        total.preempt.extend(entry.preempt)
    return total
