"""
Order the server's device work by priority, then earliest deadline.

Every unit of device work is a :class:`Job`.  A job advances in steps (one
replay segment, one recording, one naive operator); after each step the
worker picks the most urgent ready job again, so a high-priority arrival
overtakes a running low-priority inference at the next segment boundary.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from typing import Callable

from rrto_server.protocol import ErrorCode, ProtocolError

log = logging.getLogger('rrto_server.scheduler')


class Job:
    """A unit of device work; subclasses implement :meth:`step`."""

    def __init__(self, priority: int = 0, deadline: float = math.inf, task: str = ''):
        self.priority = int(priority)
        self.deadline = float(deadline)
        self.task = task
        self.arrived = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self.compute_s = 0.0
        self.seq = 0

    def sort_key(self) -> tuple:
        return (-self.priority, self.deadline, self.seq)

    def step(self) -> bool:
        """Advance by one unit; return True when the job is finished."""
        raise NotImplementedError

    def complete(self) -> None:
        """Deliver the result (called once, after the last step)."""

    def fail(self, error: ProtocolError) -> None:
        """Deliver an error instead of a result (called at most once)."""

    @property
    def queue_ms(self) -> float:
        return ((self.started or time.monotonic()) - self.arrived) * 1e3


class Scheduler:
    """One worker thread serving jobs in (priority desc, deadline asc, arrival) order."""

    def __init__(self, name: str = 'rrto-gpu', on_idle: Callable[[], None] | None = None):
        self._heap: list[tuple[tuple, Job]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stop = False
        self._on_idle = on_idle
        self.steps = 0
        self.switches = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            job.seq = next(self._seq)
            heapq.heappush(self._heap, (job.sort_key(), job))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        for _, job in self._heap:
            job.fail(ProtocolError(ErrorCode.OVERLOADED, 'server is shutting down'))
        self._heap.clear()

    def _next(self) -> Job | None:
        with self._cond:
            while not self._heap and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            return heapq.heappop(self._heap)[1]

    def _run(self) -> None:
        last: Job | None = None
        while True:
            job = self._next()
            if job is None:
                return
            if last is not None and job is not last and not _finished(last):
                self.switches += 1
            last = job
            if job.started is None:
                job.started = time.monotonic()
            t0 = time.perf_counter()
            try:
                done = job.step()
            except ProtocolError as exc:
                job.finished = time.monotonic()
                job.fail(exc)
                continue
            except Exception as exc:  # a bug in one job must not stop the worker
                log.exception('job failed')
                job.finished = time.monotonic()
                job.fail(ProtocolError(ErrorCode.INTERNAL, f'{type(exc).__name__}: {exc}'))
                continue
            finally:
                job.compute_s += time.perf_counter() - t0
                self.steps += 1
            if done:
                job.finished = time.monotonic()
                job.complete()
            else:
                with self._cond:
                    heapq.heappush(self._heap, (job.sort_key(), job))


def _finished(job: Job) -> bool:
    return job.finished is not None
