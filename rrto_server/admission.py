"""
Admission control: under overload, refuse the lowest priorities first.

The server's load is the number of inference requests in flight (admitted,
not yet answered) plus its backlog: the messages the I/O thread has already
received and not yet looked at (a batch read from the socket).  Load shares a
capacity, and each priority band may fill only a fraction of it: with the
default bands, a request below priority 1 is refused (``overloaded``,
answered at once so its robot runs locally) once the load reaches 60 % of the
capacity, one below 10 at 80 %, and a high-priority request only at 100 %.  So
as load rises the lowest band is shed first and the rest of the capacity stays
free for the tasks whose deadlines matter; a request that is admitted is never
dropped for a later one.
"""

from __future__ import annotations

import threading

from rrto_wire.errors import ErrorCode, ProtocolError

DEFAULT_CAPACITY = 64
# (lowest priority of the band, fraction of the capacity the band may fill), highest first
DEFAULT_BANDS = ((10, 1.0), (1, 0.8), (None, 0.6))


class Admission:
    """Count requests in flight and admit or shed each new one by its priority band."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, bands=DEFAULT_BANDS):
        if capacity < 1:
            raise ValueError('admission capacity must be at least 1')
        self.capacity = capacity
        self.bands = tuple(bands)
        self._in_flight = 0
        self._lock = threading.Lock()
        self.shed: dict[float, int] = {}

    def limit(self, priority: int) -> int:
        """Return how many requests may be in flight when one of ``priority`` arrives."""
        for lowest, fraction in self.bands:
            if lowest is None or priority >= lowest:
                return max(1, int(self.capacity * fraction))
        return self.capacity

    def admit(self, priority: int, backlog: int = 0) -> None:
        """Count one more request in flight, or raise ``overloaded`` if its band is full."""
        limit = self.limit(priority)
        with self._lock:
            load = self._in_flight + backlog
            if load >= limit:
                self.shed[limit] = self.shed.get(limit, 0) + 1
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f'server overloaded: load {load} (in flight {self._in_flight}, waiting '
                    f'{backlog}), priority {priority} is admitted below {limit}')
            self._in_flight += 1

    def done(self) -> None:
        """Count one admitted request answered."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def snapshot(self) -> dict:
        with self._lock:
            return {'capacity': self.capacity, 'in_flight': self._in_flight,
                    'shed': {f'limit_{k}': v for k, v in sorted(self.shed.items())}}
