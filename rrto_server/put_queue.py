"""
The server's control thread: its queue, fair between client keys, and a byte budget for uploads.

One control thread writes uploads (``put``) to the store, runs the sandbox's
trial of a newly recorded or profiled model (up to minutes) and evictions.
:class:`ControlQueue` keeps one FIFO queue per client key and serves the keys
round robin, so a key that queues many trials delays another key's upload or
recording by at most one of them per key with work queued, never by all of
its own.  Upload chunks that wait hold a whole message each; :class:`PutQueue`
bounds them (in all, and half of that per key), and a chunk beyond it is
answered ``overloaded`` (the client sends it again later) instead of being held.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Hashable

from rrto_wire.errors import ErrorCode, ProtocolError

log = logging.getLogger('rrto_server.control')


class ControlQueue:
    """
    Worker threads running submitted work round robin by key, each key's in order.

    With several ``workers`` (the fleet front's warms) a key still runs one unit at a
    time: a key with many queued units holds one worker, and another key's unit
    waits for at most one unit per key ahead of it in the round, never for all of them.
    """

    def __init__(self, name: str = 'rrto-control', workers: int = 1):
        # keys with work queued and none running, the key served longest ago first
        self._queues: collections.OrderedDict[Hashable, collections.deque] = \
            collections.OrderedDict()
        self._busy: dict[Hashable, collections.deque] = {}     # keys with a unit running
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [threading.Thread(target=self._loop, name=f'{name}-{i}' if i else name,
                                          daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[], None], key: Hashable = None) -> None:
        """Queue ``fn`` (which answers its own request) behind ``key``'s earlier work."""
        with self._cond:
            if self._stop:
                raise RuntimeError('the control thread is shut down')
            if key in self._busy:
                self._busy[key].append(fn)
                return
            self._queues.setdefault(key, collections.deque()).append(fn)
            self._cond.notify()

    def pending(self) -> int:
        """Return the number of queued (not yet started) units of work."""
        with self._cond:
            return sum(len(queue) for queues in (self._queues, self._busy)
                       for queue in queues.values())

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop after the running unit (and, unless ``cancel_futures``, the queued ones)."""
        with self._cond:
            self._stop = True
            if cancel_futures:
                self._queues.clear()
                for queue in self._busy.values():
                    queue.clear()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queues and not self._stop:
                    self._cond.wait()
                if not self._queues:
                    return
                key, queue = self._queues.popitem(last=False)   # the key served longest ago
                fn = queue.popleft()
                self._busy[key] = queue
            try:
                fn()
            except Exception:      # each unit answers its request; a bug must not stop the thread
                log.exception('control thread work raised')
            with self._cond:
                queue = self._busy.pop(key)
                if queue:
                    self._queues[key] = queue                   # to the back of the round
                    self._cond.notify()


class PutQueue:
    """
    Bytes of queued uploads: at most ``max_bytes``, and half of that per key.

    One message is always let in when nothing is queued, and one for a key that has
    nothing queued if it fits the total, so one key filling its half leaves the
    other half to the rest.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.queued = 0
        self._by_key: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def enter(self, nbytes: int, key: Hashable = None) -> None:
        """Count ``nbytes`` more as queued for ``key``, or raise ``overloaded``."""
        with self._lock:
            mine = self._by_key.get(key, 0)
            if (self.queued and self.queued + nbytes > self.max_bytes) or (
                    mine and mine + nbytes > self.max_bytes // 2):
                raise ProtocolError(ErrorCode.OVERLOADED,
                                    f'{self.queued} bytes of uploads are queued ({mine} of '
                                    'them this key\'s); send this chunk again later')
            self.queued += nbytes
            self._by_key[key] = mine + nbytes

    def leave(self, nbytes: int, key: Hashable = None) -> None:
        """Count ``nbytes`` of ``key`` as no longer queued (the control thread took them)."""
        with self._lock:
            self.queued -= nbytes
            left = self._by_key.pop(key, 0) - nbytes
            if left > 0:
                self._by_key[key] = left
