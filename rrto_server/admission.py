"""
Admission control: under overload, refuse the lowest priorities first.

The device scheduler and the CPU workers serve requests highest priority
first, so a request waits only for those at its own priority or above.  Its
load is therefore counted the same way: the inference requests in flight
(admitted, not yet answered) in its priority band and the bands above it,
plus its backlog (requests of its band the I/O thread has received and not
yet looked at).  Each band may fill a fraction of the capacity: with the
default bands a request below priority 1 is refused (``overloaded``, answered
at once so its robot runs locally) once the load of every band reaches 60 %
of the capacity, one below 10 once bands 1 and up reach 80 %, and a
high-priority request only once the high band alone fills the capacity.
Low-priority requests waiting in the queues never make a high-priority one
shed: as load rises the lowest band is shed first, and the highest only when
its own requests fill the capacity.  A request that is admitted is never
dropped for a later one.  At most ``capacity`` x (the sum of the bands'
fractions) requests are in flight.

:func:`dispatch_order` sorts each batch the I/O thread received before it is
admitted: inference requests highest priority first (behind the other kinds,
which are cheap and never shed), so a burst is admitted from the top.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from rrto_wire.errors import ErrorCode, ProtocolError

DEFAULT_CAPACITY = 64
# (lowest priority of the band, fraction of the capacity the band may fill), highest first
DEFAULT_BANDS = ((10, 1.0), (1, 0.8), (None, 0.6))
_FIRST = float('inf')       # the sort key of requests admission control never sheds


class Admission:
    """Count requests in flight per band and admit or shed each new one by its band."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, bands=DEFAULT_BANDS):
        if capacity < 1:
            raise ValueError('admission capacity must be at least 1')
        self.capacity = capacity
        self.bands = tuple(bands)
        self._in_flight = [0] * len(self.bands)
        # each band's limit, once: admit looks up a request's band once, done none
        self._limits = [max(1, int(capacity * fraction)) for _, fraction in self.bands]
        self._lock = threading.Lock()
        self.shed: dict[float, int] = {}
        self._band_of: dict[int, int] = {}     # the bands of the priorities seen (at most 64)

    def band(self, priority: int) -> int:
        """Return the index of the band ``priority`` falls in; 0 is the highest."""
        for index, (lowest, _) in enumerate(self.bands):
            if lowest is None or priority >= lowest:
                return index
        return len(self.bands) - 1

    def limit(self, priority: int) -> int:
        """Return the load at which a request of ``priority`` is refused."""
        return self._limits[self.band(priority)]

    def admit(self, priority: int, backlog: int = 0) -> int:
        """
        Count one more request in flight, or raise ``overloaded`` if its band is full.

        Returns its band, for :meth:`release` when it is answered.
        """
        band = self._band_of.get(priority)     # band(), once per priority (issue 11)
        if band is None:
            band = self.band(priority)
            if len(self._band_of) < 64:
                self._band_of[priority] = band
        limit = self._limits[band]
        with self._lock:
            ahead = sum(self._in_flight[:band + 1])
            load = ahead + backlog
            if load >= limit:
                self.shed[limit] = self.shed.get(limit, 0) + 1
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f'server overloaded: load {load} (in flight at priority {priority} or '
                    f'above {ahead}, waiting {backlog}), priority {priority} is admitted '
                    f'below {limit}')
            self._in_flight[band] += 1
        return band

    def done(self, priority: int) -> None:
        """Count one admitted request of ``priority`` answered."""
        self.release(self.band(priority))

    def release(self, band: int) -> None:
        """Count one admitted request of ``band`` (as :meth:`admit` returned it) answered."""
        with self._lock:
            self._in_flight[band] = max(0, self._in_flight[band] - 1)

    @property
    def in_flight(self) -> int:
        return sum(self._in_flight)

    def snapshot(self) -> dict:
        with self._lock:
            return {'capacity': self.capacity, 'in_flight': sum(self._in_flight),
                    'in_flight_by_band': list(self._in_flight),
                    'shed': {f'limit_{k}': v for k, v in sorted(self.shed.items())}}


def dispatch_order(admission: Admission, batch: Sequence, urgency: Callable[[object], int | None]
                   ) -> list[tuple[object, int]]:
    """
    Return a received ``batch`` in the order to dispatch it, each message with its backlog.

    ``urgency(message)`` is the priority an inference request will be admitted
    at, or None for any other kind.  Others go first, then inferences highest
    priority first; the sort is stable, so one peer's requests of one
    priority keep their order.  A message's backlog is the number of
    inference requests of its band after it.
    """
    if len(batch) == 1:
        return [(batch[0], 0)]
    keyed = [(urgency(message), message) for message in batch]
    if all(p is None for p, _ in keyed):
        return [(message, 0) for message in batch]
    keyed.sort(key=lambda pair: _FIRST if pair[0] is None else pair[0], reverse=True)
    bands = [None if p is None else admission.band(p) for p, _ in keyed]
    behind: dict[int, int] = {}
    for band in bands:
        if band is not None:
            behind[band] = behind.get(band, 0) + 1
    ordered = []
    for band, (_, message) in zip(bands, keyed):
        if band is None:
            ordered.append((message, 0))
            continue
        behind[band] -= 1
        ordered.append((message, behind[band]))
    return ordered
