"""
Link rates over time: constants, synthetic steps, and replays of measured traces.

A :class:`RateSchedule` is a piecewise-constant rate (bits/s) that loops
after its period; :meth:`RateSchedule.capacity` and its inverse
:meth:`RateSchedule.time_for` let the emulator compute, without sleeping,
when a byte count has passed through the link.  A rate of zero is an outage:
nothing passes until the rate comes back.

Measured traces are read at run time from the traces folder (``RRTO_TRACES``,
else ``../shared/traces`` beside the checkout, else ``/work/shared/traces``);
they are never copied into the project.  Formats (see the folder's README):

* ``*.json``: iperf3 ``-J`` output, ``intervals[i].sum.bits_per_second``.
* ``*.up`` / ``*.down``: Mahimahi, one line per 1500-byte delivery opportunity
  (ms timestamps), binned to ``bin_ms``; the trace loops at its last timestamp.
* ``*.csv``: 5Gophers, one ``throughput_mbps`` sample per second.
* anything else: ``time_s Mbit/s`` pairs (the 3G/HSDPA traces).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import os
from pathlib import Path
from typing import Sequence

MAHIMAHI_PACKET_BYTES = 1500


class RateSchedule:
    """A piecewise-constant rate that loops: segment ``i`` runs from ``starts[i]``."""

    def __init__(self, starts: Sequence[float], rates_bps: Sequence[float], period: float,
                 name: str = ''):
        if not starts or len(starts) != len(rates_bps) or starts[0] != 0:
            raise ValueError('a schedule needs one rate per start, starting at 0 s')
        if any(b <= a for a, b in zip(starts, list(starts[1:]) + [period])):
            raise ValueError('segment starts must increase and end before the period')
        if any(r < 0 or not math.isfinite(r) for r in rates_bps):
            raise ValueError('rates must be finite and non-negative')
        self.starts = [float(s) for s in starts]
        self.rates = [float(r) / 8 for r in rates_bps]          # bytes per second
        self.period = float(period)
        self.name = name
        ends = self.starts[1:] + [self.period]
        self.cum = [0.0]
        for start, end, rate in zip(self.starts, ends, self.rates):
            self.cum.append(self.cum[-1] + rate * (end - start))
        self.per_period = self.cum[-1]

    @property
    def mean_mbps(self) -> float:
        return self.per_period * 8 / self.period / 1e6

    def rate_at(self, t: float) -> float:
        """Return the rate in bytes/s at time ``t`` (seconds from the schedule's start)."""
        r = t % self.period
        return self.rates[bisect.bisect_right(self.starts, r) - 1]

    def capacity(self, t: float) -> float:
        """Return the bytes the link can carry from time 0 to ``t``."""
        k, r = divmod(max(0.0, t), self.period)
        i = bisect.bisect_right(self.starts, r) - 1
        return k * self.per_period + self.cum[i] + self.rates[i] * (r - self.starts[i])

    def time_for(self, nbytes: float) -> float:
        """Return the earliest time at which :meth:`capacity` reaches ``nbytes``."""
        if nbytes <= 0:
            return 0.0
        if self.per_period <= 0:
            return math.inf
        k = math.ceil(nbytes / self.per_period) - 1
        rest = nbytes - k * self.per_period
        i = bisect.bisect_left(self.cum, rest, lo=1) - 1
        i = min(i, len(self.rates) - 1)
        while self.rates[i] <= 0:        # rounding put us on an outage: move to the next rate
            i += 1
        return k * self.period + self.starts[i] + (rest - self.cum[i]) / self.rates[i]

    def scaled(self, factor: float) -> 'RateSchedule':
        """Return this schedule with every rate multiplied by ``factor``."""
        return RateSchedule(self.starts, [r * 8 * factor for r in self.rates], self.period,
                            self.name)

    def series(self) -> list[tuple[float, float]]:
        """Return ``(start_s, Mbit/s)`` for every segment (for plots and reports)."""
        return [(s, r * 8 / 1e6) for s, r in zip(self.starts, self.rates)]


def constant(mbps: float) -> RateSchedule:
    """Return a constant rate."""
    if not mbps > 0:
        raise ValueError('a constant rate must be positive')
    return RateSchedule([0.0], [mbps * 1e6], 1.0, f'{mbps:g} Mbit/s')


def steps(levels: Sequence[tuple[float, float]], loop: bool = True) -> RateSchedule:
    """
    Return ``[(Mbit/s, seconds), ...]`` as one schedule, e.g. 100 -> 5 -> 50 Mbit/s.

    With ``loop=False`` the last level holds for a day instead of repeating.
    """
    if not levels or any(seconds <= 0 or mbps < 0 for mbps, seconds in levels):
        raise ValueError('steps need (Mbit/s >= 0, seconds > 0) pairs')
    starts, rates, t = [], [], 0.0
    for mbps, seconds in levels:
        starts.append(t)
        rates.append(mbps * 1e6)
        t += seconds
    if not loop:
        t += 86400.0
    name = ' -> '.join(f'{m:g}' for m, _ in levels) + ' Mbit/s'
    return RateSchedule(starts, rates, t, name)


def traces_dir() -> Path:
    """Return the folder holding the measured traces (see the module docstring)."""
    env = os.environ.get('RRTO_TRACES')
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / 'shared' / 'traces',
                   Path('/work/shared/traces')]
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[0]


def resolve(path: str | os.PathLike) -> Path:
    """Return ``path`` as is if it exists, else relative to :func:`traces_dir`."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else traces_dir() / path


def _merge(starts: list[float], rates: list[float], period: float, name: str) -> RateSchedule:
    keep_s, keep_r = [], []
    for s, r in zip(starts, rates):
        if keep_r and keep_r[-1] == r:
            continue
        keep_s.append(s)
        keep_r.append(r)
    return RateSchedule(keep_s, keep_r, period, name)


def load_iperf3(path: Path) -> RateSchedule:
    intervals = json.loads(Path(path).read_text())['intervals']
    t0 = intervals[0]['sum']['start']
    starts = [i['sum']['start'] - t0 for i in intervals]
    rates = [max(0.0, i['sum']['bits_per_second']) for i in intervals]
    return _merge(starts, rates, intervals[-1]['sum']['end'] - t0, Path(path).name)


def load_mahimahi(path: Path, bin_ms: float = 10.0) -> RateSchedule:
    stamps = [int(line) for line in Path(path).read_text().split()]
    if not stamps:
        raise ValueError(f'{path}: empty Mahimahi trace')
    period_ms = max(stamps[-1], 1)
    bins = math.ceil(period_ms / bin_ms)
    counts = [0] * bins
    for stamp in stamps:
        counts[min(bins - 1, int(stamp // bin_ms))] += 1
    rates = [c * MAHIMAHI_PACKET_BYTES * 8 / (bin_ms / 1e3) for c in counts]
    # the last bin may be shorter than bin_ms: the period ends at the last stamp
    starts = [i * bin_ms / 1e3 for i in range(bins)]
    last_len = period_ms / 1e3 - starts[-1]
    rates[-1] = counts[-1] * MAHIMAHI_PACKET_BYTES * 8 / last_len
    return _merge(starts, rates, period_ms / 1e3, Path(path).name)


def load_5gophers(path: Path) -> RateSchedule:
    with open(path, newline='') as f:
        mbps = [float(row['throughput_mbps']) for row in csv.DictReader(f)]
    return _merge([float(i) for i in range(len(mbps))], [m * 1e6 for m in mbps],
                  float(len(mbps)), Path(path).name)


def load_pairs(path: Path) -> RateSchedule:
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    times = [float(r[0]) for r in rows]
    mbps = [float(r[1]) for r in rows]
    gaps = sorted(b - a for a, b in zip(times, times[1:])) or [1.0]
    period = times[-1] - times[0] + gaps[len(gaps) // 2]
    return _merge([t - times[0] for t in times], [m * 1e6 for m in mbps], period, Path(path).name)


def load(path: str | os.PathLike, bin_ms: float = 10.0) -> RateSchedule:
    """Load a measured trace in any of the formats in the module docstring."""
    path = resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f'trace {path} not found (set RRTO_TRACES to the traces folder)')
    suffix = path.suffix
    if suffix == '.json':
        return load_iperf3(path)
    if suffix in ('.up', '.down'):
        return load_mahimahi(path, bin_ms)
    if suffix == '.csv':
        return load_5gophers(path)
    return load_pairs(path)
