"""
CPU worker threads for the CPU side of requests, most urgent first.

Decoding tensors (including lz4/zstd), staging inputs on the device, copying
outputs back and encoding replies are CPU sub-tasks.  They run here, never on
a device lane, so a request in its CPU phase never holds the GPU, and never
on the I/O thread, which only parses headers and routes messages.  Work is
taken in the order of its key (the scheduler's urgency: priority, then
deadline), so a high-priority frame is decoded before a queue of best-effort
ones.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from typing import Callable

log = logging.getLogger('rrto_server.cpu')


class CpuWorkers:
    """A pool of threads running callables in ascending key order."""

    def __init__(self, workers: int = 2, name: str = 'rrto-cpu'):
        if workers < 1:
            raise ValueError('workers must be at least 1')
        self._heap: list[tuple[tuple, int, Callable[[], None]]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f'{name}-{i}', daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: tuple, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a worker; after :meth:`close` it runs in the caller's thread."""
        with self._cond:
            if not self._closed:
                heapq.heappush(self._heap, (key, next(self._seq), fn))
                self._cond.notify()
                return
        _call(fn)

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def close(self, timeout: float = 5.0) -> None:
        """Finish the queued work, then stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if not self._heap:
                    return
                _, _, fn = heapq.heappop(self._heap)
            _call(fn)


def _call(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # a failing task must not kill the worker; tasks answer their own errors
        log.exception('CPU task failed')
