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

A ``stats`` request is answered on the I/O thread, so what it builds must not
be the sender's to enlarge: a key's 257 full entries (each 3 windows of 4096
samples) took 179 ms per ``stats`` as deques of Python floats (a16 #6: another
client's ``hello`` waited 175 ms at p50 while one key sent ``stats`` in a
loop).  Samples are kept in float64 rings (:class:`_Window`, 32 KiB at most
each), an entry's summary is computed again only after a request changed it
(so a ``stats`` costs at most what the requests that changed its counters
cost), and never while the lock that every request's end takes is held.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from rrto_wire.summary import summarise

MAX_TASKS = 256            # names per key
MAX_ENTRIES = 1024         # (key, task) entries of all keys together
OVERFLOW_TASK = '(other)'
ANONYMOUS = 'anonymous'    # the identity of a server without keys, in by_key()
OUTCOMES = ('completed', 'expired', 'abandoned', 'failed')


class _Window:
    """The last ``size`` samples in a float64 ring (None: all of them), grown as they come."""

    __slots__ = ('size', 'data', 'count')

    def __init__(self, size: int | None):
        self.size = size
        self.data = np.empty(0)
        self.count = 0              # samples ever appended

    def append(self, value: float) -> None:
        if self.count < len(self.data) or (self.size is not None and self.count >= self.size):
            self.data[self.count % len(self.data)] = value
        else:                       # grow (doubling) up to the window
            grown = np.empty(max(64, 2 * len(self.data)) if self.size is None else
                             min(self.size, max(64, 2 * len(self.data))))
            grown[:self.count] = self.data
            grown[self.count] = value
            self.data = grown
        self.count += 1

    def values(self) -> np.ndarray:
        """Return the samples held (in no particular order: summaries do not need it)."""
        return self.data[:min(self.count, len(self.data))]


class _Task:
    def __init__(self, window: int | None):
        self.priority = 0
        self.requests = 0
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.late = 0
        self.preemptions = 0
        self.latency = _Window(window)
        self.queue = _Window(window)
        self.preempt = _Window(window)
        self.version = 0            # changes counted: its summary is built again after one
        self.summary: tuple[int, dict] | None = None

    def counters(self) -> tuple:
        """Return what :func:`_summary` needs, copied (called with the lock held)."""
        return (self.priority, self.requests, dict(self.counts), self.late, self.preemptions,
                self.latency.values().copy(), self.queue.values().copy(),
                self.preempt.values().copy())

    def snapshot(self) -> dict:
        return _summary(self.counters())


def _summary(counters: tuple) -> dict:
    priority, requests, counts, late, preemptions, latency, queue, preempt = counters
    missed = late + counts['expired'] + counts['abandoned']
    ended = counts['completed'] + counts['expired'] + counts['abandoned']
    return {'priority': priority, 'requests': requests, **counts,
            'late': late, 'deadline_misses': missed,
            'miss_rate': missed / ended if ended else 0.0,
            'in_flight': requests - sum(counts.values()),
            'preemptions': preemptions,
            'latency_ms': summarise(latency), 'queue_ms': summarise(queue),
            'preempt_ms': summarise(preempt)}


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
            entry.version += 1

    def ended(self, task: str, outcome: str, latency_s: float, *, client: str | None = None,
              late: bool = False, queue_s: float | None = None,
              preempt_s: float | None = None, preemptions: int = 0) -> None:
        """Count the outcome (one of OUTCOMES) of a request of ``task`` sent by ``client``."""
        if outcome not in OUTCOMES:
            raise ValueError(f'outcome must be one of {OUTCOMES}')
        with self._lock:
            self._ended(self._get(client, task), outcome, latency_s, late, queue_s, preempt_s,
                        preemptions)

    def arrived_and_ended(self, task: str, priority: int, outcome: str, latency_s: float, *,
                          client: str | None = None, late: bool = False,
                          queue_s: float | None = None, preempt_s: float | None = None,
                          preemptions: int = 0) -> None:
        """Count a request's arrival and its outcome at once (:meth:`arrived`, :meth:`ended`)."""
        if outcome not in OUTCOMES:
            raise ValueError(f'outcome must be one of {OUTCOMES}')
        with self._lock:
            entry = self._get(client, task)
            entry.priority = priority
            entry.requests += 1
            self._ended(entry, outcome, latency_s, late, queue_s, preempt_s, preemptions)

    @staticmethod
    def _ended(entry: _Task, outcome: str, latency_s: float, late: bool,
               queue_s: float | None, preempt_s: float | None, preemptions: int) -> None:
        # (with the lock held)
        entry.counts[outcome] += 1
        entry.late += int(late)
        entry.preemptions += preemptions
        entry.version += 1
        if outcome == 'completed':
            entry.latency.append(latency_s * 1e3)
        if queue_s is not None:
            entry.queue.append(queue_s * 1e3)
        if preempt_s is not None:
            entry.preempt.append(preempt_s * 1e3)

    def _summaries(self, keep) -> list[tuple[str | None, str, dict]]:
        """
        Return (key, task, counters) of the entries ``keep(key)`` selects, by task name.

        An entry's summary is built again only if a request changed it since the
        last one, and outside the lock (a16 #6).
        """
        with self._lock:
            chosen = [(key, task, entry) for (key, task), entry in
                      sorted(self._tasks.items(), key=_order) if keep(key)]
            stale = [(entry, entry.version, entry.counters()) for _, _, entry in chosen
                     if entry.summary is None or entry.summary[0] != entry.version]
        built = [(entry, version, _summary(counters)) for entry, version, counters in stale]
        with self._lock:
            for entry, version, summary in built:
                if entry.summary is None or entry.summary[0] < version:
                    entry.summary = version, summary
            return [(key, task, dict(entry.summary[1])) for key, task, entry in chosen]

    def snapshot(self, client: str | None = None) -> dict:
        """Return the counters of ``client``'s tasks (None: an open server's), by name."""
        return {task: data for _, task, data in self._summaries(lambda key: key == client)}

    def by_key(self) -> dict:
        """Return every key's tasks, ``{key: {task: counters}}`` (admins; None: ANONYMOUS)."""
        data: dict = {}
        for key, task, summary in self._summaries(lambda key: True):
            data.setdefault(ANONYMOUS if key is None else key, {})[task] = summary
        return data

    def totals(self) -> dict:
        """Return each task name's counters over all keys (for admins), by name."""
        with self._lock:
            groups: dict[str, list[tuple]] = {}
            for (_, task), entry in sorted(self._tasks.items(), key=_order):
                groups.setdefault(task, []).append(entry.counters())
        return {task: _summary(group[0] if len(group) == 1 else _merged(group))
                for task, group in groups.items()}


def _order(item: tuple) -> tuple:
    (key, task), _ = item
    return task, key or ''


def _merged(group: list[tuple]) -> tuple:
    """
    Return the counters of several entries of one task name as one.

    The most urgent sender's priority, the sums of the counts, every sample.
    """
    counts = {outcome: sum(c[2][outcome] for c in group) for outcome in OUTCOMES}
    return (max(c[0] for c in group), sum(c[1] for c in group), counts,
            sum(c[3] for c in group), sum(c[4] for c in group),
            *(np.concatenate([c[k] for c in group]) for k in (5, 6, 7)))
