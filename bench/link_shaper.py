"""
The emulator's shaping arithmetic: when data passes one direction of the link.

Pure computation on the times it is given (a token bucket on a rate schedule,
one-way delay, jitter, loss as stalls), so it is tested in virtual time.
"""

from __future__ import annotations

import math
import random
import threading

from bench.link_config import Direction, schedule_of

PACKET_BYTES = 1448          # TCP payload of one 1500-byte packet
MIN_BURST_BYTES = 2 * 1500


class Shaper:
    """
    Departure times of one direction: a token bucket on a rate schedule.

    Pure computation on the times it is given (no sleeping), so it is tested
    in virtual time; thread-safe because every connection shares it.
    """

    def __init__(self, direction: Direction, start: float, seed: int = 0):
        self.direction = direction
        self.start = start
        self.offset = float((direction.rate or {}).get('offset_s', 0.0))
        self.schedule = None if direction.rate is None else schedule_of(direction.rate)
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.t_last = start
        self.tokens = 0.0
        self.bytes = 0
        self.losses = 0

    def _capacity(self, t: float) -> float:
        return self.schedule.capacity(t - self.start + self.offset)

    def _time_for(self, capacity: float) -> float:
        return self.schedule.time_for(capacity) - self.offset + self.start

    def burst_bytes(self, t: float) -> float:
        rate = self.schedule.rate_at(t - self.start + self.offset)
        return max(MIN_BURST_BYTES, rate * self.direction.burst_ms / 1e3)

    def depart(self, t_arrival: float, nbytes: int) -> float:
        """Return when ``nbytes`` arriving at ``t_arrival`` have passed the bottleneck."""
        with self._lock:
            return self._depart(t_arrival, nbytes)

    def _depart(self, t_arrival: float, nbytes: int) -> float:
        self.bytes += nbytes
        if self.schedule is None:
            return t_arrival
        t = max(t_arrival, self.t_last)
        tokens = min(self.burst_bytes(t),
                     self.tokens + self._capacity(t) - self._capacity(self.t_last))
        if tokens >= nbytes:
            self.t_last, self.tokens = t, tokens - nbytes
        else:
            self.t_last = self._time_for(self._capacity(t) + nbytes - tokens)
            self.tokens = 0.0
        return self.t_last

    def busy_until(self) -> float:
        return self.t_last

    def extra_delay_s(self, nbytes: int) -> float:
        """Draw the delay after departure: one-way delay, jitter, and a stall per loss."""
        with self._lock:
            return self._extra_delay_s(nbytes)

    def _extra_delay_s(self, nbytes: int) -> float:
        d = self.direction
        delay = d.delay_ms + (self.rng.uniform(-d.jitter_ms, d.jitter_ms)
                              if d.jitter_ms else 0.0)
        if d.loss > 0:
            packets = max(1, math.ceil(nbytes / PACKET_BYTES))
            if self.rng.random() < 1.0 - (1.0 - d.loss) ** packets:
                self.losses += 1
                delay += d.stall_ms
        return max(0.0, delay) / 1e3

    def dues(self, t_arrival: float, sizes: list[int]) -> list[float]:
        """
        Return when each piece of ``sizes`` arriving together at ``t_arrival`` is delivered.

        Piece by piece, ``depart`` plus ``extra_delay_s``, under one lock
        acquisition: the same arithmetic and random draws as calling the two
        in turn, for a forwarder that reads several pieces at once.
        """
        with self._lock:
            return [self._depart(t_arrival, n) + self._extra_delay_s(n) for n in sizes]
