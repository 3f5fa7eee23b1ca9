"""
The robot's speed over a whole solve, not over whichever spell one step of it saw.

On the H200 host (2026-12-01) the robot's core ran at two speeds about 1.4x
apart in spells of one call to tens of seconds; a solve's calibration rounds
last a few seconds and priced local at the spell they fell in (ResNet-18:
111.3 ms against 77.4 on the grid, or 54.8 against 78).  A
:class:`RobotClock` runs the robot's reference compute (the local model, run
directly) wherever a step of the solve needs it and records every call with
the time it ran; :meth:`RobotClock.spread` adds one call every ``every_s``
seconds until the samples span ``span_s``; :meth:`RobotClock.level` is the
median over time slices of each slice's median, so a step that ran many
reference calls in a few seconds weighs as much as those seconds and no
more.  The solve prices local and every robot side (each its paired ratio to
the reference beside it) at that level.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


class RobotClock:
    """Every reference call of a solve with the time it started; the level they give."""

    def __init__(self, call: Callable[[], object], every_s: float = 1.0,
                 now: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None):
        if every_s <= 0:
            raise ValueError('every_s must be positive')
        self._call = call
        self.every_s = every_s
        self._now = now or time.perf_counter
        self._sleep = sleep or time.sleep
        self.samples: list[tuple[float, float]] = []   # (started at s, ms)

    def time(self, record: bool = True) -> float:
        """Run the reference call once; return its wall ms (recorded unless ``record`` off)."""
        start = self._now()
        self._call()
        ms = (self._now() - start) * 1e3
        if record:
            self.add(start, ms)
        return ms

    def add(self, at_s: float, ms: float) -> None:
        """Record a reference call that started at ``at_s`` (this clock's time) and took ms."""
        self.samples.append((at_s, float(ms)))

    def span_s(self) -> float:
        """Return the seconds between the first and the last sample (0: fewer than two)."""
        if len(self.samples) < 2:
            return 0.0
        times = [at for at, _ in self.samples]
        return max(times) - min(times)

    def spread(self, span_s: float) -> None:
        """Add a reference call every ``every_s`` seconds until the samples span ``span_s``."""
        if not self.samples:
            self.time()
        first = min(at for at, _ in self.samples)
        while self._now() - first < span_s:
            last = max(at for at, _ in self.samples)
            wait = last + self.every_s - self._now()
            if wait > 0:
                self._sleep(min(wait, first + span_s - self._now()))
            self.time()

    def level(self, default: float | None = None) -> float:
        """
        Return the median over ``every_s``-long time slices of each slice's median ms.

        ``default`` when nothing was recorded (None: an error).
        """
        if not self.samples:
            if default is None:
                raise ValueError('no reference call was recorded')
            return default
        first = min(at for at, _ in self.samples)
        slices: dict[int, list[float]] = {}
        for at, ms in self.samples:
            slices.setdefault(int((at - first) // self.every_s), []).append(ms)
        return statistics.median(statistics.median(v) for v in slices.values())

    def summary(self) -> dict:
        """Return the clock's samples and level as JSON (times from the first sample)."""
        if not self.samples:
            return {'samples': [], 'span_s': 0.0}
        first = min(at for at, _ in self.samples)
        return {'level_ms': self.level(), 'span_s': self.span_s(), 'every_s': self.every_s,
                'samples': [[round(at - first, 3), round(ms, 3)] for at, ms in self.samples]}
